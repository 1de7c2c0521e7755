"""Building blocks of the models: each module declares the logical axes of its weights."""

from jaxarch.layers.attention import Attention, document_mask
from jaxarch.layers.embeddings import Embed
from jaxarch.layers.mlp import SwiGLU
from jaxarch.layers.norms import RMSNorm
from jaxarch.layers.params import param
from jaxarch.layers.rope import apply_rope
