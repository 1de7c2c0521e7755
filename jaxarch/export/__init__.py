"""Trained models out of jaxarch: safetensors weights with config and tokenizer, a dense
model in Hugging Face's Llama format, and the prefill and decode step as StableHLO
(`jaxarch export`)."""

from jaxarch.export.huggingface import write_llama
from jaxarch.export.stablehlo import export_stablehlo
from jaxarch.export.weights import (ExportError, all_or_nothing, load_safetensors,
                                    write_model)
