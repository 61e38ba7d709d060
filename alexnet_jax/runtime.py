"""What must happen before JAX starts: simulated CPU devices and multi-process.

On a machine with no accelerator, a config that needs N devices gets N CPU
devices (XLA's host platform can pretend to be several), so the multi-device
configs run on a laptop. Beyond one machine, JAX's own runtime joins the
processes: `jax.distributed.initialize()` finds the coordinator itself under
Slurm, Open MPI and Kubernetes (JobSet), or takes the explicit flags.
"""

import os

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



def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=runtime.parse_flags)`: absl's parsing, with
  a mistake in --config or --config.FIELD told in a line or two (what was
  wrong, what is accepted) instead of a traceback through ml_collections."""
  import sys
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      # A config file that cannot be read fails only at first use.
      flags.FLAGS.config.keys()
    return rest
  except (flags.Error, KeyError, AttributeError, ValueError, OSError) as e:
    print(f'error: {_flag_error(argv, e)}\nPass --helpshort or --helpfull to '
          'see help on flags.', file=sys.stderr)
    sys.exit(1)


def _chain(e: BaseException) -> list[BaseException]:
  out = [e]
  while (out[-1].__cause__ or out[-1].__context__) is not None:
    out.append(out[-1].__cause__ or out[-1].__context__)
  return out


def _flag_error(argv: list[str], e: Exception) -> str:
  import glob
  import re
  config_flag = next((a for a in argv[1:] if a.startswith('--config=')),
                     '--config')
  missing = [x for x in _chain(e) if isinstance(x, KeyError)]
  if missing:
    # An override of a field the config lacks. ml_collections's message,
    # "'modl'\nDid you mean "model" instead of "modl"?", is on the outer
    # KeyError; the inner one has the bare name.
    name, _, hint = str(missing[0].args[0] if missing[0].args
                        else missing[0]).partition('\n')
    name = name.strip('\'"')
    flag = next((a.split('=', 1)[0] for a in argv[1:]
                 if a.startswith('--config.')
                 and name in a.split('=', 1)[0].split('.')), '--config.FIELD')
    return (f'{flag}: the config has no field {name!r}.'
            + (f' {hint}' if hint else ''))
  if isinstance(e, OSError):
    reason = re.findall(r'\[Errno \d+\] ([^:\n]+)', str(e))
    configs = ', '.join(sorted(
        p for p in glob.glob(os.path.join('configs', '*.py'))
        if not p.endswith('__init__.py')))
    return (f'{config_flag}: cannot load it'
            + (f' ({reason[-1]})' if reason else '')
            + (f'; the configs are {configs}' if configs else '') + '.')
  if 'Error whilst parsing config file' in str(e):
    # The config file raised (e.g. an unknown :ARG): its own message, not
    # the traceback ml_collections wraps it in.
    return f'{config_flag}: {_chain(e)[-1]}'
  return str(e)
