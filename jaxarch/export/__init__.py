"""Trained models out of jaxarch: safetensors weights with config and tokenizer, dense and
MoE models in Hugging Face's Llama and Mixtral formats, and the prefill and decode step as
StableHLO (`jaxarch export`)."""

from jaxarch.export.huggingface import write_hf
from jaxarch.export.stablehlo import export_stablehlo
from jaxarch.export.weights import (ExportError, all_or_nothing, load_safetensors,
                                    write_model)
