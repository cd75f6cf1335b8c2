"""The run machinery behind train.py: options, the step, the tasks, checkpoints, the log, stop
signals, --reproduce, and the CPU tuning."""
