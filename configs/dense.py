"""Dense decoder-only transformer: the baseline every other family is compared to.

Quick start on a laptop CPU (a few minutes, byte-level, default Python-stdlib corpus):

  jaxarch train --config=configs/dense.py:tiny --workdir=/tmp/jaxarch/tiny

Paper-scale presets, the dense baselines of the UltraMem paper (arXiv 2411.12364, Table 1).
Their shapes are chosen here so that the non-embedding parameter count 12·d²·L matches the
paper's name (SwiGLU with d_ff ≈ 8/3·d keeps 3·d·d_ff ≈ 8·d², attention keeps 4·d²):

  preset  d_model  layers  heads x head_dim  d_ff   non-embedding params
  small   256      4       4 x 64             688    3.16M (CPU benchmarks and sweeps)
  151m    1024     12      8 x 128           2752   151.8M
  680m    1536     24      12 x 128          4096   679.6M
  1.6b    2048     32      16 x 128          5504   1.62B

  jaxarch train --config=configs/dense.py:151m --workdir=/gcs/BUCKET/dense-151m

The byte tokenizer (vocab 256 + specials) is the default; `model.vocab_size` is 384, its
ids rounded up to a multiple of 128, so the output head shards evenly over the `tensor`
axis (nothing rounds a size given: give a multiple of 128 for another tokenizer).
"""

import ml_collections

PRESETS = {
    # CPU quick start: 0.89M params, 500 steps of 16 x 128 bytes in about 2.5 minutes on
    # 2 cores, reaching about 2.6 validation bits per byte on the stdlib corpus.
    'tiny': dict(
        model=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                   max_len=256, dtype='float32'),
        data=dict(seq_len=128),
        train=dict(steps=500, batch_size=16, lr=3e-3, warmup_steps=50),
        checkpoint=dict(every_steps=250),
        log=dict(every_steps=10, eval_every_steps=250, eval_batches=8),
    ),
    # CPU benchmarks and sweeps: 3.36M params; the base of the matched MoE and UltraMem
    # `small` presets (26.2M total, 4.4M active each).
    'small': dict(
        model=dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=688,
                   max_len=1024, dtype='float32'),
        data=dict(seq_len=256),
        train=dict(steps=2000, batch_size=32, lr=2e-3, warmup_steps=100),
        checkpoint=dict(every_steps=500),
        log=dict(every_steps=20, eval_every_steps=500, eval_batches=8),
    ),
    '151m': dict(
        model=dict(d_model=1024, n_layers=12, n_heads=8, n_kv_heads=8, d_ff=2752),
    ),
    '680m': dict(
        model=dict(d_model=1536, n_layers=24, n_heads=12, n_kv_heads=12, d_ff=4096),
    ),
    '1.6b': dict(
        model=dict(d_model=2048, n_layers=32, n_heads=16, n_kv_heads=16, d_ff=5504),
    ),
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()

  # Model section.
  c.model = ml_collections.ConfigDict()
  # Names the family for checks, messages and BiTA's base; dense, MoE and UltraMem build
  # the same Transformer, whose blocks block_pattern and the side layers' sections choose.
  c.model.family = 'dense'
  c.model.d_model = 1024
  c.model.n_layers = 12
  c.model.n_heads = 8
  c.model.n_kv_heads = 8
  c.model.head_dim = ml_collections.config_dict.placeholder(int)  # None: d_model // n_heads
  c.model.d_ff = 2752
  c.model.vocab_size = 384  # byte tokenizer: 256 bytes + specials, rounded up to 128
  c.model.max_len = 2048
  # Repeated over the layers: 'dense', 'moe' (configs/moe.py) or a registered block's name;
  # UltraMem's memory layers sit beside the blocks (model.ultramem.placement).
  c.model.block_pattern = ('dense',)
  c.model.tie_embeddings = False
  c.model.rope_theta = 10_000.0
  # RoPE frequency scaling: type 'none', Llama 3.1's 'llama3' or 'linear' (`jaxarch import`
  # sets it). llama3: wavelengths over original_max_len / low_freq_factor turn `factor` times
  # longer, those under original_max_len / high_freq_factor stay, those between are
  # interpolated. linear (Gemma 3's global layers): all turn `factor` times longer.
  c.model.rope_scaling = ml_collections.ConfigDict(dict(
      type='none', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_len=8192))
  # Biases on the query, key and value projections, as Qwen2's (`jaxarch import` sets it).
  c.model.qkv_bias = False
  # An RMSNorm over each head's query and key before the rotation, as Qwen3's (`jaxarch
  # import` sets it).
  c.model.qk_norm = False
  # Sliding-window attention, Mistral's: a query sees the keys less than `sliding_window`
  # positions before it (None: every earlier key), in the blocks `attention_pattern` marks
  # 'local', cycled over them as block_pattern is (Gemma 3's: 5 'local', then 'global').
  c.model.sliding_window = ml_collections.config_dict.placeholder(int)
  c.model.attention_pattern = ('local',)
  # Gemma 3's (`jaxarch import` sets them): the sliding-window blocks' RoPE theta, unscaled
  # (None: rope_theta and rope_scaling, as the other blocks); the token embeddings times
  # sqrt(d_model) (the tied head unscaled); an RMSNorm on the attention's and the MLP's
  # outputs before they are added ("sandwich" norms); the MLP gate's activation, silu
  # (SwiGLU) or gelu_tanh (GeGLU; dense blocks only).
  c.model.local_rope_theta = ml_collections.config_dict.placeholder(float)
  c.model.embed_scale = False
  c.model.post_norms = False
  c.model.mlp_activation = 'silu'
  c.model.norm_eps = 1e-6
  c.model.init_std = 0.02
  c.model.init_truncation = 0.0  # > 0: the normal init cut at ±this many std (MEGABYTE: 2)
  # GPT-2: the layers that write to the residual stream start at init_std / sqrt(2·layers).
  c.model.residual_init_scale = True
  c.model.dtype = 'bfloat16'  # compute; parameters stay in param_dtype
  c.model.param_dtype = 'float32'
  c.model.remat = 'none'  # none | full | dots (save matmul outputs)
  # True: the blocks' weights stacked by layer and run by one lax.scan (MaxText's
  # scan_layers): the step compiles one period of blocks, not every layer.
  c.model.scan_layers = False
  c.model.attention_impl = 'auto'  # auto (cuDNN flash on GPU in bf16, else XLA) | xla | cudnn

  # Data section.
  c.data = ml_collections.ConfigDict()
  c.data.source = 'default'  # default | files:<glob> | tfds:<name> | SRC,W;SRC,W (mixture)
  c.data.seq_len = 1024
  c.data.tokenizer = 'bytes'  # bytes | path to a SentencePiece .model or HF tokenizer.json
  # None: $JAXARCH_DATA_DIR, else ~/.cache/jaxarch/data
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.validation_fraction = 0.05  # split by document; of tfds: without validation/test
  c.data.pack_align = 1  # documents start at multiples of this (MEGABYTE: the patch size)
  # Threads per process that read and tokenize the training documents (at most its CPU
  # cores; 0: in the prefetch thread alone). One core tokenizes ~0.8M BPE tokens/s, an H100
  # trains the 151m at ~0.4M: a node of 8 needs several (benchmarks/data_pipeline.py). The
  # byte tokenizer and distilled data have nothing to tokenize, and take none.
  c.data.num_threads = 16
  # The id each document and prompt starts with; None: the tokenizer's end-of-document id.
  # `jaxarch import` sets a Llama's own (`<s>`: 1, Llama 3's `<|begin_of_text|>`: 128000).
  c.data.bos_id = ml_collections.config_dict.placeholder(int)
  # False: no BOS at all, documents and prompts are the text's ids alone, as Qwen's
  # tokenizers encode them (`jaxarch import` sets it for a Qwen2, Qwen2.5, Qwen3).
  c.data.add_bos = True
  # Ids besides the end-of-document id at which generation stops: an instruct model's end
  # of turn (`jaxarch import` sets Llama 3's `<|eot_id|>` 128009, Qwen2.5's `<|im_end|>`).
  c.data.stop_ids = ()
  # An instruct model's Jinja chat template, for `jaxarch generate --chat` (`jaxarch import`
  # keeps the checkpoint's as the run's tokenizer/chat_template.jinja); None: no template.
  c.data.chat_template = ml_collections.config_dict.placeholder(str)
  # tfds: the feature of each example to read (None: `text`, or the only text feature);
  # files: the key of each .jsonl record's text and the .parquet/.arrow files' column
  # (None: `text`); plain text files do not read it
  c.data.text_key = ml_collections.config_dict.placeholder(str)

  # Mesh section: ('data', 'fsdp', 'tensor', 'expert'); one size may be -1.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1))
  # Logical axis -> mesh axes (MaxText style). The batch is split over every axis that
  # does not split the model's weights along the same dimension.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp', 'expert')),
      ('length', None),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('head_dim', None),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('expert', 'expert'),
      ('values', ('fsdp', 'tensor')),
      ('norm', None),
  )

  # Training section.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch_size = 256  # global, in sequences
  # Microbatches per step: gradients of batch_size / grad_accum_steps rows at a time, summed,
  # when the whole batch's activations do not fit (same loss and update, more time).
  c.train.grad_accum_steps = 1
  c.train.lr = 3e-4
  c.train.seed = 0
  c.train.schedule = 'cosine'  # cosine | wsd | constant
  c.train.warmup_steps = 2_000
  c.train.min_lr_ratio = 0.1  # cosine and wsd: final lr = lr * min_lr_ratio
  c.train.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  # The first Adam moment's dtype: bfloat16 saves 2 of the 12 bytes of state per parameter
  # (the second moment keeps the parameters' dtype, float32: its small values underflow in
  # bf16).
  c.train.mu_dtype = 'float32'
  c.train.z_loss = 0.0  # weight of log(Z)^2, stabilises large runs
  # Parameter groups by their `optim_group` metadata, e.g. UltraMem's memory values:
  # values=dict(lr_multiplier=4.0, multiplier_decay='linear'). See train/optimizer.py.
  c.train.groups = ml_collections.ConfigDict()
  # A NaN or Inf loss or gradient is never applied; then: stop (with a report naming the
  # step and the layers) | skip (counted; stops at the next non-finite step after
  # max_consecutive_skips skipped in a row).
  c.train.nonfinite = 'stop'
  c.train.max_consecutive_skips = 10
  # A new run's initial model: that of another run's checkpoint (its workdir; the latest
  # readable checkpoint, or init_from_step's), for continued pretraining or fine-tuning,
  # with this config's model shapes. The step, optimizer state, schedule and data start
  # afresh; a resumed run reads its own checkpoint.
  c.train.init_from = ml_collections.config_dict.placeholder(str)
  c.train.init_from_step = ml_collections.config_dict.placeholder(int)

  # Checkpoint section.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1_000
  c.checkpoint.keep = 3  # the last ones
  c.checkpoint.keep_best = True  # and the one with the lowest eval_loss
  c.checkpoint.async_save = True

  # Logging and eval section.
  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.eval_every_steps = 1_000
  c.log.eval_batches = 50
  c.log.tensorboard = True
  c.log.progress = True

  # Launch section: the cluster `jaxarch launch` renders jobs for (launch/README.md). It
  # describes where the run goes, not what it trains, so it is left out of config hashes.
  # nodes x devices_per_node must be the mesh's device count (mesh.ici x mesh.dcn).
  c.launch = ml_collections.ConfigDict()
  c.launch.name = 'jaxarch'  # SLURM job, JobSet, xpk workload or TPU VM name ([a-z0-9-])
  c.launch.nodes = 1  # hosts, one process each: SLURM nodes, GKE pods, TPU VM workers, Ray nodes
  c.launch.devices_per_node = 8  # GPUs per node, or TPU chips per host (4 on v4 / v5p)
  # GKE accelerator label: nvidia-* for GPU node pools (nvidia-h100-80gb, nvidia-h200-141gb),
  # tpu-* for TPU slices (tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice).
  c.launch.accelerator = 'nvidia-h100-80gb'
  c.launch.tpu_type = 'v5p-8'  # TPU: xpk --tpu-type / the TPU VM's accelerator type
  c.launch.tpu_topology = '2x2x1'  # TPU: chips of one slice, GKE's gke-tpu-topology
  c.launch.slices = 1  # TPU multislice: slices joined over DCN, which mesh.dcn spans
  c.launch.image = 'jaxarch:latest'  # GKE container image, built from launch/Dockerfile
  c.launch.cluster = ml_collections.config_dict.placeholder(str)  # GKE cluster, for xpk
  c.launch.project = ml_collections.config_dict.placeholder(str)  # None: gcloud's default
  c.launch.zone = ml_collections.config_dict.placeholder(str)  # None: gcloud's default
  c.launch.partition = ml_collections.config_dict.placeholder(str)  # SLURM; None: default
  c.launch.account = ml_collections.config_dict.placeholder(str)  # SLURM; None: default
  c.launch.time_limit = '24:00:00'  # SLURM --time
  # SLURM: the nodes for the job alone (--exclusive); False shares them, e.g. for a sweep of
  # one-GPU runs (then give their CPUs and memory in slurm_options).
  c.launch.exclusive = True
  # SLURM: more sbatch options, each --key=value, e.g. '--qos=high --constraint=h100
  # --cpus-per-gpu=16 --mem-per-gpu=200G'.
  c.launch.slurm_options = ''
  c.launch.max_restarts = 3  # GKE: JobSet restarts after a failure; training resumes
  # Seconds from SIGTERM to the kill that the job asks for: room for the processes to agree
  # on a step to stop after (every 5 s of training or so) and write a checkpoint. GKE pods
  # get it as their grace period (Kubernetes' default is 30 s, as a Spot VM's notice);
  # SLURM sends SIGTERM this long before the time limit.
  c.launch.stop_grace_s = 300
  # jax.distributed's coordinator port on process 0's host. None: SLURM's jobs take JAX's
  # port of their job id (jobs that share a node do not collide), TPU jobs JAX's 8482,
  # the GKE GPU JobSet and Ray 1234.
  c.launch.coordinator_port = ml_collections.config_dict.placeholder(int)
  # Shell commands run on each host before training (SLURM, TPU VM), e.g.
  # 'source ~/jaxarch/.venv/bin/activate'; GKE and Ray use the image / cluster as they are.
  c.launch.setup = ''

  if arg:
    if arg not in PRESETS:
      raise ValueError(f'config error: unknown preset {arg!r} for configs/dense.py; '
                       f'expected one of {sorted(PRESETS)}')
    for section, values in PRESETS[arg].items():
      c[section].update(values)
  return c
