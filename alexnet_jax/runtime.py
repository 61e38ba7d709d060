"""What must happen before JAX starts: simulated CPU devices and multi-process.

On a machine with no accelerator, a config that needs N devices gets N CPU
devices (XLA's host platform can pretend to be several), so the multi-device
configs run on a laptop. Beyond one machine, JAX's own runtime joins the
processes: `jax.distributed.initialize()` finds the coordinator itself under
Slurm, Open MPI and Kubernetes (JobSet), or takes the explicit flags.
"""

from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with cluster '
    'auto-detection (Slurm, Open MPI, Kubernetes).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 20,
    'Multi-process: a process that sends no heartbeat for this long is taken '
    'as lost, and every other process exits with an error naming it instead '
    "of waiting for it in a collective. JAX's own default is 100.",
    lower_bound=1)


def cpu_devices_needed(config) -> int:
  if config.parallelism == 'none':
    return 1
  return config.num_devices if config.num_devices > 0 else config.cpu_devices


def setup(config, *, num_cpu_devices: int | None = None) -> None:
  import jax
  needed = num_cpu_devices or cpu_devices_needed(config)
  # Called from Python (a notebook) no command line was parsed: one process.
  parsed = flags.FLAGS.is_parsed()
  explicit = parsed and _COORDINATOR.value is not None
  distributed = explicit or (parsed and _DISTRIBUTED.value)
  if needed > 1:
    # Only the CPU backend reads this: on a GPU machine it changes nothing.
    processes = (_NUM_PROCESSES.value or 1) if explicit else 1
    if needed % processes:
      raise ValueError(f'{needed} simulated CPU devices do not split over '
                       f'{processes} processes')
    jax.config.update('jax_num_cpu_devices', needed // processes)
  if distributed:
    if explicit:
      jax.distributed.initialize(
          coordinator_address=_COORDINATOR.value,
          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    else:
      jax.distributed.initialize(
          heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    logging.info('jax.distributed: process %d of %d', jax.process_index(),
                 jax.process_count())

