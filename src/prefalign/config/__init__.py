"""Typed configs: dataclasses filled from YAML, then from `--key value` command-line flags.

One source of truth per option: the dataclass field gives its type, default and help, and
from it come the YAML key (`learning_rate`), the flag (`--learning-rate`) and the `--help`
line. Unknown keys, wrong types and values out of range are refused with a message that
names the key and what is valid.

Options come in sections (options.Section: model, data, optim, run, sampling, ...), frozen
dataclasses that a command's config composes by inheritance; a section titles a group of
`--help` and may be a mapping in YAML, while attributes, flags and the saved config.yaml
stay flat.

  options.py    option, option_like, Section, sections(), require
  values.py     YAML files and value conversion (coerce)
  arguments.py  argparse flags and positional arguments from a config class
  build.py      configs from YAML and flags (build_config, config_from_args), and back
"""

from prefalign.config.arguments import add_config_arguments, config_flags
from prefalign.config.build import (
    build_config,
    config_from_args,
    config_to_dict,
    flat_values,
    save_config,
)
from prefalign.config.options import (
    Section,
    command_name,
    option,
    option_like,
    require,
    sections,
)
from prefalign.config.values import coerce, load_yaml

__all__ = ["Section", "add_config_arguments", "build_config", "coerce", "command_name",
           "config_flags", "config_from_args", "config_to_dict", "flat_values", "load_yaml",
           "option", "option_like", "require", "save_config", "sections"]
