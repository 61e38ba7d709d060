"""Config overrides in tests, as --config.FIELD=VALUE gives them."""


def set_fields(config, fields: dict):
  """Sets each dotted field ('model.width') of `config`; returns it."""
  for path, value in fields.items():
    node = config
    *parents, leaf = path.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
