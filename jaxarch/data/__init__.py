"""Data: document sources (TFDS array_record builders), tokenizers and the Grain pipeline."""

from jaxarch.data.pipeline import cpu_cores
from jaxarch.data.pipeline import make_eval_dataset
from jaxarch.data.pipeline import make_train_dataset
from jaxarch.data.pipeline import MixtureEvalBatches
from jaxarch.data.pipeline import synthetic_batch
from jaxarch.data.pipeline import tokenizes_in_threads
from jaxarch.data.sources import files_taken_from
from jaxarch.data.sources import open_source
from jaxarch.data.sources import resolve_data_dir
from jaxarch.data.tokenizers import ByteTokenizer
from jaxarch.data.tokenizers import bos_id
from jaxarch.data.tokenizers import get_tokenizer
from jaxarch.data.tokenizers import ids_past_model
from jaxarch.data.tokenizers import model_tokenizer
from jaxarch.data.tokenizers import stop_ids
