"""Generation with KV caches for every jaxarch language model (`generate`, `Generator`)."""

from jaxarch.infer.decoding import add_caches, decode_step, for_inference, prefill
from jaxarch.infer.generate import Generator, generate
from jaxarch.infer.sampling import METHODS, GenerateError, Sampling, next_tokens
