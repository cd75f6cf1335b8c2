import mlx.core as mx
import mlx.nn as nn

from models.ops import Dense


class MLP(nn.Module):
    """784 -> hidden -> ... -> 10 with ReLU and dropout; takes uint8 NHWC images."""

    def __init__(self, hidden=(512, 512), dropout=0.1, num_classes=10):
        super().__init__()
        sizes = [28 * 28, *hidden]
        self.layers = [Dense(i, o) for i, o in zip(sizes[:-1], sizes[1:])]
        self.head = Dense(sizes[-1], num_classes)
        self.dropout = nn.Dropout(dropout)

    def __call__(self, images):
        x = images.reshape(images.shape[0], -1).astype(mx.float32) / 255.0
        for layer in self.layers:
            x = self.dropout(nn.relu(layer(x)))
        return self.head(x)
