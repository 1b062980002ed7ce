"""LeRobot v2.x datasets through grain: reading, writing, openpi's transforms, norm stats.

Modules: source (LeRobotSource, holdout_episodes), writer (LeRobotWriter, write_lerobot_dataset),
transforms (openpi's LIBERO chain, policy_transforms), norm_stats (compute / save / load),
pipeline (make_pipeline: shuffle, batch, prefetch, shard; checkpointable iterator).
"""

from eqx_energy.data.norm_stats import NormStats as NormStats
from eqx_energy.data.source import LeRobotSource as LeRobotSource
from eqx_energy.data.transforms import Group as Group
from eqx_energy.data.writer import LeRobotWriter as LeRobotWriter
