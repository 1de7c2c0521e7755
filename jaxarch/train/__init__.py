"""Training machinery: state and optimizer, the loop, checkpoints, metrics, FLOPs/MFU."""

from jaxarch.train.trainer import evaluate, train
