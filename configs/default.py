"""The paper's recipe, shared by every config (Krizhevsky et al. 2012, section 5).

    python -m alexnet_jax.main --config=configs/default.py --workdir=/tmp/alexnet

trains the original two-column network on one device on ImageNet: 90 epochs,
batch 128, SGD with momentum 0.9 and weight decay 5e-4, learning rate 0.01
divided by 10 when the validation error stops improving (at most 3 times). The
paper reports 40.7% top-1 / 18.2% top-5 validation error (10 crops, PCA
lighting). The variants below change only what they name.

    configs/default.py:digits     the embedded digits data on a CPU
    configs/default.py:synthetic  random data, a few steps (smoke test)
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'original'        # 'original' (2012), 'owt' (2014), 'one_column'
  c.model.num_classes = 1000
  c.model.dropout_rate = 0.5
  c.model.dtype = 'float32'           # compute: float32, bfloat16 or float64
  c.model.width = 1.0                 # multiplies every conv and FC width
  c.model.lrn = 'default'             # 'default' (per variant), 'on' or 'off'
  c.model.lrn_n = 5                   # LRN constants of section 3.3
  c.model.lrn_k = 2.0
  c.model.lrn_alpha = 1e-4
  c.model.lrn_beta = 0.75
  # One window over both columns' maps (Caffe's bvlc_alexnet); the paper
  # normalises each column's maps apart.
  c.model.lrn_across_columns = False
  c.model.pool_window = 3             # 3/2: overlapping pooling (section 3.4)
  c.model.pool_stride = 2
  c.model.init_scheme = 'paper'       # 'paper' or 'he'
  c.model.activation = 'relu'         # 'relu' (section 3.1) or 'tanh'
  # How conv1, the grouped convolutions and max-pooling are computed: the
  # same function and parameters in every choice; 'auto' takes the faster
  # one for the platform (models.LOWERINGS, docs/benchmarks.md).
  c.model.conv1 = 'auto'              # 'direct' or 'space_to_depth'
  c.model.grouped_conv = 'auto'       # 'grouped' or 'split'
  c.model.pooling = 'auto'            # 'reduce_window' or 'strided'

  c.dataset = 'imagenet2012'          # 'imagenet2012', 'folder', 'digits', 'synthetic'
  # The prepared 256x256 store (python -m alexnet_jax.prepare --out=...).
  c.store_dir = ml_collections.FieldReference(None, field_type=str)
  c.input = ml_collections.ConfigDict()
  c.input.lighting_sigma = 0.1        # PCA lighting (section 4.1); 0 turns it off
  c.input.workers = -1                # decoding threads; -1: one per CPU core
  c.input.processes = 0               # worker processes sharing them; 0: none
  # 'mean_image': subtract the store's per-pixel mean (section 2);
  # 'imagenet_mean_std': torchvision's per-channel mean and std, which its
  # published weights (python -m alexnet_jax.convert) expect.
  c.input.normalization = 'mean_image'
  c.ten_crop_eval = False             # the paper's 10 patches (section 4.1)
  c.image_size = -1                   # -1: the variant's (227 or 224)
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.num_train = 1024
  c.synthetic.num_eval = 256

  c.batch_size = 128                  # global, over all devices
  c.eval_batch_size = 256
  c.num_epochs = 90
  c.num_train_steps = -1              # -1: num_epochs of the dataset
  c.seed = 0
  # Fine-tuning: the workdir of a trained or converted run whose parameters
  # start this one (layers whose shape differs, the new classifier fc8, start
  # from their initialisation), and which layers train: 'all' or 'head' (fc8).
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.trainable = 'all'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decay_biases = False    # Caffe and cuda-convnet2 exclude biases
  c.optimizer.momentum_convention = 'paper'  # 'paper' or 'torch'
  c.optimizer.schedule = 'plateau'    # 'plateau', 'step' or 'constant'
  c.optimizer.plateau_factor = 0.1
  c.optimizer.plateau_patience = 4    # evaluations without improvement
  c.optimizer.plateau_threshold = 1e-3  # smallest drop of top-1 error that counts
  c.optimizer.max_drops = 3
  c.optimizer.step_epochs = 30        # 'step': torchvision's every 30 epochs
  # Learning rate for a batch k times reference_batch_size: 'none', 'sqrt'
  # (Krizhevsky 2014's theory) or 'linear_conv' (his configs: conv layers k x).
  c.optimizer.batch_scaling = 'none'
  c.optimizer.reference_batch_size = 128

  c.parallelism = 'none'              # 'none', 'data', 'two_column', 'weird_trick'
  c.mesh_shape = ()                   # (data, model); () = the scheme's layout
  c.num_devices = -1                  # -1: every local accelerator
  c.cpu_devices = 1                   # devices to simulate with no accelerator

  c.log_every_steps = 50
  c.eval_every_steps = -1             # -1: once per epoch
  c.checkpoint_every_steps = 1000     # also at every evaluation and at the end
  c.max_checkpoints_to_keep = 3

  if arg:
    apply_variant(c, arg)
  return c


def apply_variant(c: ml_collections.ConfigDict, arg: str) -> None:
  """Shrinks a config for a laptop; every config takes the same arguments."""
  if arg == 'digits':
    # A quarter-width network on 99x99 digits trains on 2 CPU cores in a few
    # minutes. The paper's initialisation leaves a network this small flat at
    # ln(10) for many epochs; He-normal weights with zero biases do not.
    c.dataset = 'digits'
    c.model.num_classes = 10
    c.model.width = 0.25
    c.model.init_scheme = 'he'
    c.image_size = 99
    c.batch_size = 64
    c.eval_batch_size = 100
    c.num_epochs = 15
    c.optimizer.plateau_patience = 2
    c.log_every_steps = 10
    c.checkpoint_every_steps = 50
  elif arg == 'synthetic':
    c.dataset = 'synthetic'
    c.model.num_classes = 10
    c.model.width = 0.25
    c.image_size = 99
    c.batch_size = 16
    c.eval_batch_size = 16
    c.synthetic.num_train = 64
    c.synthetic.num_eval = 32
    c.num_epochs = 1
    c.log_every_steps = 1
  else:
    raise ValueError(f"Unknown config argument {arg!r}: use 'digits' or "
                     "'synthetic', or none for the full run.")
