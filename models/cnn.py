import mlx.core as mx
import mlx.nn as nn

from models.conv import ConvPool
from models.ops import STOCK, Dense


class CNN(nn.Module):
    """Two 3x3 conv + max-pool blocks (32, 64 channels), then 128 hidden units; takes uint8 NHWC images.

    Each block is computed by `ops.conv_pool` (models/ops.py): the same parameters either way."""

    def __init__(self, channels=(32, 64), hidden=128, dropout=0.5, num_classes=10, ops=STOCK):
        super().__init__()
        self.convs = [ConvPool(1, channels[0], ops.conv_pool), ConvPool(channels[0], channels[1], ops.conv_pool)]
        self.fc = Dense(7 * 7 * channels[1], hidden)
        self.head = Dense(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def __call__(self, images):
        x = images.astype(mx.float32) / 255.0
        for conv_pool in self.convs:
            x = nn.relu(conv_pool(x))  # = pool(relu(conv)), with a quarter of the relu work
        x = self.dropout(nn.relu(self.fc(x.reshape(x.shape[0], -1))))
        return self.head(x)
