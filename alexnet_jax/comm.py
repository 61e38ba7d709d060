"""What each parallel scheme sends between devices, read from the compiled step.

    python -m alexnet_jax.comm --config=configs/two_gpu.py:synthetic
    python -m alexnet_jax.comm --config=configs/two_gpu.py --num_devices=2 \
        --schemes=data,two_column,weird_trick

For every requested scheme the real train step is built as training builds it
(`models.from_config`, `optim.make_optimizer`, `parallel.make_scheme`,
`train.create_train_state`, `train.make_train_step`), lowered for the config's
global batch on abstract inputs and compiled; the collectives are then read
from the compiled program's HLO text (`--hlo=lowered`: from the HLO JAX emits,
before XLA changes it; the two agree in float32, but the CPU compiler runs
bfloat16 collectives in float32, which a GPU does not). Nothing runs and no
parameter is allocated, so the full-size network can be inspected on a laptop.

Collectives counted: all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute, in their synchronous form or as an asynchronous
`X-start`/`X-done` pair (counted once, at the start, with the shape of the
done). A collective whose result is a tuple (XLA combines many small
all-reduces into one) is listed one array per row.

Bytes moved, per device per step. For an array of B bytes and a replica group
of n devices, the number is what each device sends (and, by symmetry, receives)
under a bandwidth-optimal ring algorithm:

  all-gather          B_out * (n-1)/n     every shard but its own comes in
  reduce-scatter      B_in  * (n-1)/n     (= B_out * (n-1))
  all-reduce          B * 2(n-1)/n        a reduce-scatter then an all-gather
  all-to-all          B * (n-1)/n         all but the block it keeps
  collective-permute  B                   its whole buffer, if it sends at all
                                          (n: the devices in its pairs)

so a group of one device moves nothing. Rows list the array the HLO
instruction returns (for a reduce-scatter, the 1/n share each device keeps);
its bytes are the row's payload. The per-scheme payload totals (in bytes and
in values) count only collectives whose groups hold more than one device: a
gradient all-reduce's payload is the gradients being summed. Collectives
inside loops would run several times per step; the train step has none, so
every collective here runs once.

Every collective is put in one category, from the JAX name stack XLA keeps in
its metadata (`op_name`):

  activation  the model's own collectives, forward and backward: the gathers
              of `AlexNet` and their transposes (reduce-scatters), and in the
              one weird trick the all-reduce of the logits' cotangent.
  gradient    all-reduces of a parameter's gradient over the devices that
              replicate it: shard_map's transpose of the implicit broadcast
              of a replicated parameter (named `.../<layer>/psum...`). It
              happens after Flax casts the parameter to the compute dtype,
              so a bfloat16 model sums its gradients in bfloat16.
  metric      the train step's psum of the loss, top-1, top-5 and count sums.
  other       anything else (none is expected: the update after shard_map is
              elementwise on arrays that carry their shardings).

`report(config, schemes, devices)` returns the numbers as a dict;
`format_report` prints them as the command line does, with a check of
Krizhevsky's 2014 argument: the conv layers hold a few percent of the
parameters, so data parallelism all-reduces about the whole parameter volume
every step, the one weird trick only the conv gradients plus the FC
activations, and the two columns (one pair of devices) only activations.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from alexnet_jax import models, optim, parallel, runtime, train, validation

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
         'collective-permute')
CATEGORIES = ('activation', 'gradient', 'metric', 'other')
DEFAULT_SCHEMES = ('data', 'two_column', 'weird_trick')


# ----------------------------------------------------------------------------
# HLO text.

@dataclasses.dataclass(frozen=True)
class Collective:
  """One array moved by one collective of the compiled program."""

  kind: str                # one of KINDS
  shape: tuple[int, ...]   # the array as the HLO result holds it
  dtype: str               # HLO element type: 'f32', 'bf16', ...
  group_size: int          # devices in each replica group
  payload_bytes: int       # bytes of `shape`
  bytes_moved: float       # per device, by the convention of the docstring
  op_name: str             # JAX name stack from the metadata ('' if none)
  instruction: str         # the HLO instruction it belongs to
  is_async: bool           # an X-start / X-done pair


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: str
  attributes: str
  computation: str


def _matching(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at `text[start]`."""
  pairs = {'(': ')', '{': '}', '[': ']'}
  stack = []
  for i in range(start, len(text)):
    ch = text[i]
    if ch in pairs:
      stack.append(pairs[ch])
    elif stack and ch == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f'Unbalanced brackets in HLO: {text[start:start + 80]!r}')


_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$')
_OPCODE = re.compile(r'\s*(?P<opcode>[a-z][a-z0-9\-]*)\(')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*[({]')


def _parse_instructions(hlo_text: str) -> list[_Instruction]:
  instructions = []
  computation = ''
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or line.lstrip().startswith('HloModule'):
      if line.rstrip().endswith('{') and (header := _COMPUTATION.match(line)):
        computation = header.group('name')
      continue
    rest = match.group('rest')
    # The shape is a tuple in parentheses or one token ('f32[2,3]{1,0}').
    if rest.startswith('('):
      end = _matching(rest, 0)
    else:
      end = rest.find(' ')
      if end < 0:
        continue
    shape, tail = rest[:end], rest[end:]
    op = _OPCODE.match(tail)
    if not op:
      continue
    open_paren = op.end() - 1
    close = _matching(tail, open_paren)
    instructions.append(_Instruction(
        name=match.group('name'), shape=shape, opcode=op.group('opcode'),
        operands=tail[open_paren + 1:close - 1], attributes=tail[close:],
        computation=computation))
  return instructions


_ARRAY = re.compile(r'([a-z][a-z0-9]*)\[([0-9,]*)\]')


def parse_shape(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """HLO shape text -> [(dtype, dims)], a tuple flattened in order."""
  shape = re.sub(r'/\*.*?\*/', '', shape)   # '/*index=5*/' markers
  shape = re.sub(r'\{[^{}]*\}', '', shape)  # layouts
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in _ARRAY.findall(shape)]


def dtype_bits(dtype: str) -> int:
  """Bits of an HLO element type: the number in its name ('bf16' -> 16)."""
  if dtype == 'pred':
    return 8
  match = re.match(r'[a-z]+(\d+)', dtype)
  return int(match.group(1)) if match else 0  # token[], opaque[]: no data


def array_bytes(dtype: str, dims: Sequence[int]) -> int:
  return math.prod(dims) * dtype_bits(dtype) // 8


def group_size(attributes: str, num_devices: int) -> int:
  """Devices per replica group, from either of XLA's two spellings."""
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attributes)
  if iota:  # [num_groups,group_size]<=[...]: the iota form
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([\d,\s]*)\}', attributes)
  if listed:  # {{0,1},{2,3}}: every group has the first one's size
    return len(listed.group(1).split(','))
  # No groups, or 'replica_groups={}': one group of every device.
  return num_devices


def _permute_pairs(attributes: str) -> list[tuple[str, str]]:
  """(source, target) pairs of a collective-permute."""
  if 'source_target_pairs=' not in attributes:
    return []
  pairs = attributes.split('source_target_pairs=', 1)[1].split('}}', 1)[0]
  return re.findall(r'\{(\d+),(\d+)', pairs)


def bytes_moved(kind: str, payload: int, n: int) -> float:
  """Bytes one device sends per step; see the module docstring."""
  if kind in ('all-gather', 'reduce-scatter', 'all-to-all'):
    # For reduce-scatter `payload` is the input; callers pass it so.
    return payload * (n - 1) / n
  if kind == 'all-reduce':
    return 2 * payload * (n - 1) / n
  if kind == 'collective-permute':
    return float(payload)
  raise ValueError(f'Not a collective: {kind!r}')


def _operand_names(operands: str) -> list[str]:
  """Names of an instruction's operands, printed '%x' or 'f32[2] %x' or 'x'."""
  names = re.findall(r'%([\w.\-]+)', operands)
  if names:
    return names
  # Unprefixed names: the last token of each comma-separated operand.
  return [part.split()[-1] for part in re.sub(r'\(.*?\)|\[.*?\]|\{.*?\}', '',
                                              operands).split(',')
          if part.strip()]


def _op_name(attributes: str) -> str:
  match = re.search(r'op_name="([^"]*)"', attributes)
  return match.group(1) if match else ''


def _element_op_names(op_name: str, count: int) -> list[str] | None:
  """Splits a combined op's name 'prefix/(a:b:c)' into its parts' names."""
  match = re.match(r'^(.*/)\((.*)\)$', op_name)
  if not match:
    return None
  parts = match.group(2).split(':')
  if len(parts) != count:
    return None
  return [match.group(1) + part for part in parts]


def parse_collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every array moved by a collective of an HLO module, in program order.

  Args:
    hlo_text: `compiled.as_text()` (also works on HLO before optimisation).
    num_devices: devices of the program, the group of 'replica_groups={}'.
  """
  instructions = _parse_instructions(hlo_text)
  users: dict[str, list[_Instruction]] = {}
  for inst in instructions:
    for operand in _operand_names(inst.operands):
      users.setdefault(operand, []).append(inst)
  # Per-element names of a tuple result, from its get-tuple-element users.
  element_names: dict[tuple[str, int], str] = {}
  for inst in instructions:
    if inst.opcode == 'get-tuple-element':
      index = re.search(r'index=(\d+)', inst.attributes)
      operand = _operand_names(inst.operands)
      if index and operand:
        element_names[(operand[0], int(index.group(1)))] = _op_name(
            inst.attributes)

  def done_of(start: _Instruction) -> _Instruction:
    # X-start -> [X-update ->] X-done: the done holds the result's shape.
    current = start
    for _ in range(8):
      following = [u for u in users.get(current.name, [])
                   if u.opcode.endswith(('-done', '-update'))]
      if not following:
        break
      current = following[0]
      if current.opcode.endswith('-done'):
        return current
    raise ValueError(f'No done for asynchronous {start.opcode} {start.name}')

  # Computations an asynchronous start wraps. Under a generic 'async-start'
  # the plain collective inside is the transfer (counted there, as async);
  # under a sugared 'X-start' that still names one it is the same transfer
  # as the start, so it is not counted twice.
  sugared, generic = set(), {}
  for inst in instructions:
    called = re.findall(r'calls=%?([\w.\-]+)', inst.attributes)
    if inst.opcode == 'async-start':
      generic.update((name, inst) for name in called)
    elif inst.opcode.endswith('-start') and inst.opcode[:-6] in KINDS:
      sugared.update(called)

  found = []
  for inst in instructions:
    is_async = inst.opcode.endswith('-start')
    kind = inst.opcode[:-6] if is_async else inst.opcode
    if kind not in KINDS or (not is_async and inst.computation in sugared):
      continue
    result = done_of(inst) if is_async else inst
    arrays = parse_shape(result.shape)
    op_name = _op_name(inst.attributes) or _op_name(result.attributes)
    wrapper = generic.get(inst.computation)
    if wrapper is not None:
      is_async = True
      op_name = op_name or _op_name(wrapper.attributes)
    combined = _element_op_names(op_name, len(arrays)) or [op_name] * len(
        arrays)
    if kind == 'collective-permute':
      # The 'group' of a permute: every device that sends or receives.
      pairs = _permute_pairs(inst.attributes)
      n = len({device for pair in pairs for device in pair})
    else:
      n = group_size(inst.attributes, num_devices)
    for index, (dtype, dims) in enumerate(arrays):
      payload = array_bytes(dtype, dims)
      if len(arrays) > 1:
        name = element_names.get((result.name, index)) or combined[index]
      else:
        name = op_name
      if kind == 'collective-permute':
        sends = any(source != target for source, target in pairs)
        moved = bytes_moved(kind, payload, n) if sends else 0.0
      elif kind == 'reduce-scatter':
        moved = bytes_moved(kind, payload * n, n)  # the result is 1/n of it
      else:
        moved = bytes_moved(kind, payload, n)
      found.append(Collective(
          kind=kind, shape=dims, dtype=dtype, group_size=n,
          payload_bytes=payload, bytes_moved=moved, op_name=name,
          instruction=inst.name, is_async=is_async))
  return found


# ----------------------------------------------------------------------------
# Categories.

def _scope(op_name: str) -> list[str]:
  """The name stack inside shard_map, without transformation wrappers."""
  # The compiled module names the body 'jit(step)/shard_map/...'; the lowered
  # one keeps it in a computation of its own, without the prefix.
  tail = op_name.split('shard_map/', 1)[-1]
  parts = []
  for part in tail.split('/'):
    # 'transpose(jvp(conv1))' is the scope 'conv1' seen by autodiff.
    while (m := re.match(r'^(?:jvp|transpose|vmap|jit)\((.*)\)$', part)):
      part = m.group(1)
    if part:
      parts.append(part)
  return parts


def classify(collective: Collective, param_sizes: dict[str, dict[str, int]],
             model_name: str = 'AlexNet') -> dict[str, Any]:
  """Category, pass ('fwd'/'bwd') and parameter of one collective.

  Args:
    collective: from `parse_collectives`.
    param_sizes: {layer: {'kernel': local size, 'bias': local size}}, the
      per-device sizes, which tell a kernel's gradient from its bias's.
    model_name: the Flax module's class name, the root of its name stack.
  """
  op_name = collective.op_name
  scope = _scope(op_name)
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  param = None
  if (collective.kind == 'all-reduce' and len(scope) >= 2
      and scope[-2] in param_sizes and scope[-1].startswith('psum')):
    category = 'gradient'
    size = math.prod(collective.shape)
    # Flax adds the bias as a (1, ..., 1, features) array, so compare sizes.
    names = [k for k, v in param_sizes[scope[-2]].items() if v == size]
    param = f'{scope[-2]}/{names[0]}' if len(names) == 1 else scope[-2]
  elif re.search(rf'\b{re.escape(model_name)}\b', op_name):
    category = 'activation'
  elif (collective.kind == 'all-reduce' and len(scope) == 1
        and scope[0].startswith('psum')):
    category = 'metric'  # the step's own psum, outside the model
  else:
    category = 'other'
  if len(scope) == 1 and category == 'activation':
    source = f'{model_name}/{scope[0]}'  # written in __call__ itself
  else:
    source = '/'.join(scope[-2:]) if scope else '?'
  return {'category': category, 'pass': direction, 'param': param,
          'source': source}


# ----------------------------------------------------------------------------
# The train step.

def _abstract_train_state(model, tx, scheme, image_size: int, seed: int):
  """`train.create_train_state` traced, not run: shapes with shardings."""
  captured = {}

  def build():
    state, shardings = train.create_train_state(model, tx, scheme, image_size,
                                                seed)
    captured['shardings'] = shardings
    return state

  shapes = jax.eval_shape(build)
  shardings = captured['shardings']
  state = jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                               sharding=sharding),
      shapes, shardings)
  return state, shardings


HLO_STAGES = ('compiled', 'lowered')


def lower_train_step(config, scheme_name: str, devices):
  """The lowered train step of `config` under one scheme.

  Returns (lowered, scheme, abstract state). The inputs are abstract arrays
  with the shardings training gives them: the global batch split by the
  scheme's batch axes (float32 images and int32 labels, as `alexnet_jax.data`
  yields them), a Python float learning rate and a PRNG key.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.parallelism = scheme_name
  validation.check_config(config)
  # float64 runs in JAX's 64-bit mode, scoped as training scopes it.
  with jax.enable_x64(config.model.dtype == 'float64'):
    return _lower_train_step(config, scheme_name, devices)


def _lower_train_step(config, scheme_name: str, devices):
  scheme = parallel.make_scheme(scheme_name, devices, tuple(config.mesh_shape))
  validation.check_layout(config, scheme, jax.process_count())
  image_size = validation.image_size(config)
  model = models.from_config(config)
  tx = optim.make_optimizer(config)
  state, shardings = _abstract_train_state(model, tx, scheme, image_size,
                                           config.seed)
  lr_multipliers = optim.step_lr_multipliers(config, state['params'])
  train_step = train.make_train_step(model, tx, scheme, shardings,
                                     lr_multipliers)
  batch_sharding = scheme.sharding(scheme.batch_spec)
  batch = {
      'image': jax.ShapeDtypeStruct(
          models.input_shape(image_size, config.batch_size), jnp.float32,
          sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                    sharding=batch_sharding),
  }
  lowered = train_step.lower(state, batch, config.optimizer.learning_rate,
                             jax.random.key(config.seed + 1))
  return lowered, scheme, state


def hlo_texts(lowered, stage: str) -> tuple[str, str]:
  """(text of `stage`, text of the other stage) of a lowered step.

  'compiled' is the default: the program that runs, after XLA has combined,
  made asynchronous or dropped collectives, and after SPMD partitioning, so a
  collective the partitioner added outside shard_map would show too.
  'lowered' is the HLO JAX emits before XLA optimises it (with the name stack
  kept, for the categories): the same collectives as 'compiled' in float32,
  but in the model's own dtypes, which the CPU compiler widens (it runs
  bfloat16 collectives in float32, a GPU does not). Shapes are per device in
  both: shard_map's body is written with local shapes.
  """
  if stage not in HLO_STAGES:
    raise ValueError(f'hlo must be one of {HLO_STAGES}, got {stage!r}')
  lowered_text = lowered.as_text(dialect='hlo', debug_info=True)
  if stage == 'lowered':
    return lowered_text, ''
  return lowered.compile().as_text(), lowered_text


def _param_table(state) -> dict[str, dict[str, Any]]:
  """Global and per-device sizes of every parameter."""
  table = {}
  for layer, leaves in state['params'].items():
    table[layer] = {}
    for name, leaf in leaves.items():
      local = leaf.sharding.shard_shape(leaf.shape)
      table[layer][name] = {
          'size': math.prod(leaf.shape), 'local_size': math.prod(local),
          'bytes': math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize,
          'local_bytes': math.prod(local) * jnp.dtype(leaf.dtype).itemsize}
  return table


def scheme_report(config, scheme_name: str, devices,
                  hlo: str = 'compiled') -> dict[str, Any]:
  """Collectives and totals of one scheme; see `report`."""
  lowered, scheme, state = lower_train_step(config, scheme_name, devices)
  text, other_text = hlo_texts(lowered, hlo)
  num_devices = scheme.mesh.devices.size
  params = _param_table(state)
  local_sizes = {layer: {name: p['local_size'] for name, p in leaves.items()}
                 for layer, leaves in params.items()}
  rows = []
  for c in parse_collectives(text, num_devices):
    row = {'kind': c.kind, 'shape': c.shape, 'dtype': c.dtype,
           'elements': math.prod(c.shape),
           'group_size': c.group_size, 'payload_bytes': c.payload_bytes,
           'bytes_moved': c.bytes_moved, 'op_name': c.op_name,
           'instruction': c.instruction, 'async': c.is_async}
    row.update(classify(c, local_sizes, models.AlexNet.__name__))
    rows.append(row)
  moved = {k: sum(r['bytes_moved'] for r in rows if r['category'] == k)
           for k in CATEGORIES}
  moved['total'] = sum(r['bytes_moved'] for r in rows)
  # Arrays that cross devices: a group of one device sends nothing.
  crossing = [r for r in rows if r['group_size'] > 1]
  payload = {k: sum(r['payload_bytes'] for r in crossing if r['category'] == k)
             for k in CATEGORIES}
  payload['total'] = sum(r['payload_bytes'] for r in crossing)
  # Values rather than bytes, for comparing with parameter counts whatever
  # the dtype (a bfloat16 model's gradients are all-reduced in bfloat16).
  elements = {k: sum(r['elements'] for r in crossing if r['category'] == k)
              for k in CATEGORIES}
  elements['total'] = sum(r['elements'] for r in crossing)
  notes = []
  if other_text:
    # The CPU compiler runs bfloat16 collectives in float32: say so, with
    # the bytes of the program as written, which a GPU keeps.
    written = parse_collectives(other_text, num_devices)
    as_written = sum(c.bytes_moved for c in written)
    if as_written != moved['total']:
      before = ', '.join(sorted({c.dtype for c in written}))
      after = ', '.join(sorted({r['dtype'] for r in rows}))
      notes.append(
          f'the program as JAX wrote it moves {as_written:,.0f} bytes per '
          f'device ({before} collectives), the compiled one '
          f'{moved["total"]:,.0f} ({after}); hlo=lowered lists the former')
  return {'mesh': dict(scheme.mesh.shape), 'devices': num_devices,
          'hlo': hlo, 'collectives': rows, 'bytes_moved': moved,
          'payload_bytes': payload, 'payload_elements': elements,
          'params': params, 'notes': notes}


def _check(scheme, claim, measured, expected, unit, ok):
  return {'scheme': scheme, 'claim': claim, 'measured': measured,
          'expected': expected, 'unit': unit, 'ok': ok}


def _checks(result: dict[str, Any]) -> list[dict[str, Any]]:
  """Krizhevsky 2014's argument, tested on the measured numbers.

  Gradients are compared in values, not bytes: the all-reduces run in the
  model's compute dtype, which need not be the parameters' float32.
  """
  p = result['params']
  schemes = result['schemes']
  checks = []
  if 'data' in schemes:
    grads = schemes['data']['payload_elements']['gradient']
    checks.append(_check('data', 'all-reduces the gradient of every parameter',
                         grads, p['total'], 'values', grads == p['total']))
  if 'weird_trick' in schemes:
    s = schemes['weird_trick']
    grads = s['payload_elements']['gradient']
    checks.append(_check(
        'weird_trick', 'all-reduces only the conv gradients (FC layers are '
        'split)', grads, p['conv'], 'values', grads == p['conv']))
    if 'data' in schemes:
      total = s['bytes_moved']['total']
      data_total = schemes['data']['bytes_moved']['total']
      checks.append(_check(
          'weird_trick', 'moves fewer bytes than data parallelism', total,
          data_total, 'bytes', total < data_total))
  if 'two_column' in schemes:
    s = schemes['two_column']
    if s['mesh'][parallel.DATA] == 1:
      moved = s['bytes_moved']['gradient']
      checks.append(_check(
          'two_column', 'moves only activations (no gradient crosses '
          'devices)', moved, 0, 'bytes', moved == 0))
    else:
      # Pairs replicated over 'data': each device sums its half of every
      # parameter's gradient with the other pairs.
      local = sum(v['local_size'] for leaves in s['params'].values()
                  for v in leaves.values())
      grads = s['payload_elements']['gradient']
      checks.append(_check(
          'two_column', "all-reduces each device's half of the gradients "
          "over the 'data' axis", grads, local, 'values', grads == local))
  return checks


def report(config, schemes: Sequence[str] = DEFAULT_SCHEMES,
           devices: Sequence[Any] | int | None = None,
           hlo: str = 'compiled') -> dict[str, Any]:
  """Collectives of the train step of `config` under each scheme.

  Args:
    config: a configs/*.py config (its `parallelism` is replaced by each
      scheme in turn; every other field is used as training uses it).
    schemes: names from `parallel.SCHEMES`.
    devices: the devices of the mesh, or how many of `jax.devices()` to use
      (None: all of them).
    hlo: 'compiled' (the program XLA runs) or 'lowered' (the program JAX
      emits, in the model's dtypes, not compiled); see `hlo_texts`.

  Returns:
    {'devices': n, 'hlo': hlo, 'config': {...},
     'params': {'conv', 'fc', 'total',
     'conv_bytes', 'fc_bytes', 'bytes', 'by_layer'},
     'schemes': {name: {'mesh', 'devices', 'hlo', 'notes': [str],
                        'collectives': [row, ...],
                        'bytes_moved': {category: bytes, 'total'},
                        'payload_bytes': {category: bytes, 'total'},
                        'payload_elements': {category: values, 'total'},
                        'params': per-parameter sizes}},
     'checks': [{'scheme', 'claim', 'measured', 'expected', 'unit', 'ok'}]}
    A row is {'kind', 'shape', 'dtype', 'elements', 'group_size',
    'payload_bytes',
    'bytes_moved', 'category', 'pass', 'param', 'source', 'op_name',
    'instruction', 'async'}; bytes are per device per step.
  """
  if devices is None:
    devices = jax.devices()
  elif isinstance(devices, int):
    if devices > len(jax.devices()):
      raise validation.ConfigError(
          f'{devices} devices requested, this machine has '
          f'{len(jax.devices())}')
    devices = jax.devices()[:devices]
  devices = list(devices)
  result = {
      'devices': len(devices), 'hlo': hlo,
      'config': {'variant': config.model.variant, 'width': config.model.width,
                 'image_size': validation.image_size(config),
                 'batch_size': config.batch_size,
                 'num_classes': config.model.num_classes,
                 'dtype': config.model.dtype},
      'schemes': {}}
  for name in schemes:
    result['schemes'][name] = scheme_report(config, name, devices, hlo)
  any_scheme = next(iter(result['schemes'].values()), None)
  if any_scheme is not None:
    by_layer = {layer: sum(v['size'] for v in leaves.values())
                for layer, leaves in any_scheme['params'].items()}
    layer_bytes = {layer: sum(v['bytes'] for v in leaves.values())
                   for layer, leaves in any_scheme['params'].items()}
    conv = [l for l in by_layer if l in models.CONV_LAYERS]
    fc = [l for l in by_layer if l in models.FC_LAYERS]
    result['params'] = {
        'by_layer': by_layer, 'conv': sum(by_layer[l] for l in conv),
        'fc': sum(by_layer[l] for l in fc), 'total': sum(by_layer.values()),
        'conv_bytes': sum(layer_bytes[l] for l in conv),
        'fc_bytes': sum(layer_bytes[l] for l in fc),
        'bytes': sum(layer_bytes.values())}
    result['checks'] = _checks(result)
  return result


# ----------------------------------------------------------------------------
# Text.

def _bytes(value: float) -> str:
  return f'{value:,.0f}'


def _mib(value: float) -> str:
  return f'{value / 2**20:,.2f}'


def format_scheme(name: str, s: dict[str, Any]) -> str:
  mesh = ' x '.join(f'{axis}={size}' for axis, size in s['mesh'].items())
  lines = [f'== {name}: mesh {mesh} ({s["devices"]} devices)']
  header = (f'  {"#":>3}  {"pass":4}  {"kind":18}  {"shape":20}  {"dtype":5}  '
            f'{"n":>2}  {"array bytes":>13}  {"moved/device":>13}  '
            f'{"category":10}  source')
  lines.append(header)
  for i, r in enumerate(s['collectives'], 1):
    kind = r['kind'] + (' (async)' if r['async'] else '')
    shape = '[' + ','.join(str(d) for d in r['shape']) + ']'
    source = r['param'] or r['source']
    lines.append(
        f'  {i:>3}  {r["pass"]:4}  {kind:18}  {shape:20}  {r["dtype"]:5}  '
        f'{r["group_size"]:>2}  {_bytes(r["payload_bytes"]):>13}  '
        f'{_bytes(r["bytes_moved"]):>13}  {r["category"]:10}  {source}')
  if not s['collectives']:
    lines.append('  (no collectives)')
  lines += [f'  note: {note}' for note in s['notes']]
  return '\n'.join(lines)


def format_totals(result: dict[str, Any]) -> str:
  names = list(result['schemes'])
  width = max(14, *(len(n) + 2 for n in names))
  lines = ['Bytes moved per device per step (MiB in brackets):',
           f'  {"":11}' + ''.join(f'{n:>{width + 11}}' for n in names)]
  for category in CATEGORIES + ('total',):
    cells = []
    for n in names:
      v = result['schemes'][n]['bytes_moved'][category]
      cells.append(f'{_bytes(v):>{width}} ({_mib(v):>7})')
    lines.append(f'  {category:11}' + ''.join(f'{c:>{width + 11}}'
                                                for c in cells))
  return '\n'.join(lines)


def format_checks(result: dict[str, Any]) -> str:
  p = result['params']
  lines = [
      'Parameters: conv {conv:,} ({cf:.1%}), fc {fc:,} ({ff:.1%}), total '
      '{total:,} ({bytes:,} bytes). Krizhevsky 2014: the conv layers hold '
      'about 5% of the parameters and 90-95% of the compute.'.format(
          cf=p['conv'] / p['total'], ff=p['fc'] / p['total'], **p)]
  schemes = result['schemes']
  for name, s in schemes.items():
    moved, values = s['bytes_moved'], s['payload_elements']['gradient']
    lines.append(
        f'  {name}: gradient all-reduces between devices sum {values:,} '
        f'values = {values / p["total"]:.3f} x the parameters; it moves '
        f'{_bytes(moved["gradient"])} gradient + '
        f'{_bytes(moved["activation"])} activation bytes per device')
  if 'data' in schemes and schemes['data']['bytes_moved']['total']:
    reference = schemes['data']['bytes_moved']['total']
    for name, s in schemes.items():
      if name != 'data':
        ratio = s['bytes_moved']['total'] / reference
        lines.append(f'  {name} moves {ratio:.3f} x the bytes of data '
                     'parallelism')
  for c in result['checks']:
    lines.append(f'  [{"ok" if c["ok"] else "FAILED"}] {c["scheme"]} '
                 f'{c["claim"]}: {_bytes(c["measured"])} vs '
                 f'{_bytes(c["expected"])} {c["unit"]}')
  return '\n'.join(lines)


def format_report(result: dict[str, Any]) -> str:
  c = result['config']
  parts = [f'{c["variant"]} network, width {c["width"]}, {c["image_size"]}x'
           f'{c["image_size"]} images, batch {c["batch_size"]}, '
           f'{c["num_classes"]} classes, {c["dtype"]}, {result["devices"]} '
           f'devices; collectives of the {result["hlo"]} HLO']
  parts += [format_scheme(n, s) for n, s in result['schemes'].items()]
  if result['schemes']:
    parts += [format_totals(result), format_checks(result)]
  return '\n\n'.join(parts)


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when this module is the program: alexnet_jax.main defines
  # its own --config, and a process may import both modules.
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, '
                                  'optionally with :ARG (digits, synthetic).',
                                  lock_config=True)
  flags.DEFINE_list(
      'schemes', None, 'Schemes to compare (default: data, two_column and '
      "weird_trick; two_column only for the 'original' network).")
  flags.DEFINE_integer(
      'num_devices', 0, 'Devices of the mesh (simulated on a CPU); 0: the '
      "config's num_devices, else its cpu_devices, else 2.")
  flags.DEFINE_enum(
      'hlo', 'compiled', HLO_STAGES, "'compiled': the program XLA runs; "
      "'lowered': the program JAX emits, in the model's own dtypes (the CPU "
      'compiler widens bfloat16 collectives to float32).')
  flags.mark_flags_as_required(['config'])


def _default_devices(config) -> int:
  if config.num_devices > 0:
    return config.num_devices
  return config.cpu_devices if config.cpu_devices > 1 else 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  num_devices = FLAGS.num_devices or _default_devices(config)
  runtime.setup(config, num_cpu_devices=num_devices)  # before JAX starts
  schemes = FLAGS.schemes or [
      s for s in DEFAULT_SCHEMES
      if s != 'two_column' or config.model.variant == 'original']
  unknown = [s for s in schemes if s not in parallel.SCHEMES]
  try:
    if unknown:
      raise validation.ConfigError(
          f'--schemes: {unknown} not in {parallel.SCHEMES}')
    result = report(config, schemes, num_devices, FLAGS.hlo)
  except validation.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_report(result))
  if not all(c['ok'] for c in result['checks']):
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=runtime.parse_flags)
