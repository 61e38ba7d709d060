"""Fine-tuning: a new classifier (fc8) on the features of a trained network.

Starting from torchvision's published weights, converted once into a run, on
a folder of images laid out as ROOT/<class>/<image> (or ROOT/train/<class>/...
with ROOT/val/<class>/...) that has N classes:

    python -m alexnet_jax.convert --torchvision=alexnet-owt-7be5be79.pth --workdir=/tmp/torchvision
    python -m alexnet_jax.prepare --dataset=folder --source=ROOT --out=/tmp/store
    python -m alexnet_jax.main --config=configs/fine_tune.py \\
        --config.init_from=/tmp/torchvision --config.store_dir=/tmp/store \\
        --config.model.num_classes=N --workdir=/tmp/fine_tuned
    python -m alexnet_jax.predict --workdir=/tmp/fine_tuned IMAGE...

conv1-fc7 keep the converted values and only fc8, initialised afresh with N
outputs, learns: a logistic regression on fc7's features, 15 epochs of batch
64 on every local device (data parallel), learning rate 0.01 divided by 10
every 5 epochs. The validation top-1 and top-5 of every epoch are in
/tmp/fine_tuned/metrics.jsonl. N must be given: the config cannot see the
folder, and a wrong N fails before anything is compiled with an error that
gives the right --config.model.num_classes.

    --config.trainable=all --config.optimizer.learning_rate=0.001

fine-tunes every layer instead, from the same start; the lower rate keeps the
converted features from being overwritten by the new head's early gradients.
Another run (one of configs/one_weird_trick.py, say) starts it the same way
given the --config.model fields and --config.input.normalization of its
config.json ('mean_image' for runs trained here): a model field that differs
from the run's (variant, width, activation, LRN, pooling) stops the run before
training with both values named; another normalisation is allowed, with a
warning, since another dataset may need its own.
Running the same command again resumes from /tmp/fine_tuned's own
checkpoints, not from --config.init_from.
"""

from configs import default


def get_config(arg=None):
  if arg:
    # The laptop variants of the other configs train from scratch on data
    # that ship with the code; fine-tuning needs a trained run and a folder.
    raise ValueError(
        f'configs/fine_tune.py takes no argument (got {arg!r}): it needs '
        '--config.init_from (a trained or converted run) and '
        '--config.store_dir (a prepared folder). For a small CPU run '
        'override the network instead, e.g. --config.model.width=0.25 '
        '--config.image_size=63, with an init_from run of that width.')
  c = default.get_config()
  c.model.variant = 'owt'           # torchvision's layout, as convert writes
  c.dataset = 'folder'
  # The normalisation torchvision's weights were trained with.
  c.input.normalization = 'imagenet_mean_std'
  c.trainable = 'head'
  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = 15
  c.optimizer.learning_rate = 0.01
  c.optimizer.schedule = 'step'
  c.optimizer.step_epochs = 5
  c.parallelism = 'data'
  c.num_devices = -1
  # A folder is small: a log line and an evaluation per epoch need fewer steps.
  c.log_every_steps = 10
  c.checkpoint_every_steps = 500
  return c
