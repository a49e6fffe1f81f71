"""One typed config: defaults < YAML file < ``--section.key=value`` overrides.

Every key lives in a section dataclass (one file each: model.py, data.py, train.py,
parallel.py, log.py, vision.py; root.py holds them together with the checks across sections);
an unknown key, a value of the wrong type or an impossible combination raises
:class:`ConfigError` with a one-line message that names the key and says what to change
(fields.py). load.py reads YAML and overrides. ``Config.to_dict()`` is what each run folder
saves as ``config.yaml``.
"""

from moe.config.data import DataConfig
from moe.config.fields import ConfigError
from moe.config.load import (
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    saved_differences,
    set_key,
    upgrade_saved,
)
from moe.config.log import LogConfig
from moe.config.model import ModelConfig, RopeScalingConfig
from moe.config.parallel import ParallelConfig
from moe.config.root import Config
from moe.config.train import TrainConfig
from moe.config.vision import VisionConfig

__all__ = ["Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "ParallelConfig",
           "RopeScalingConfig", "TrainConfig", "VisionConfig", "apply_overrides", "from_dict",
           "load_config", "parse_override", "saved_differences", "set_key", "upgrade_saved"]
