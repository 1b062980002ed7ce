"""eqx_energy: energy-based action correction for flow-matching VLA policies, in JAX + Equinox.

Classes are re-exported here; functions stay in their modules (`eqx_energy.losses`,
`eqx_energy.correct`), so `import eqx_energy.correct` keeps working.
"""

from eqx_energy.correct import CorrectionConfig as CorrectionConfig
from eqx_energy.correct import CorrectionTrace as CorrectionTrace
from eqx_energy.energy import ContextEncoding as ContextEncoding
from eqx_energy.energy import EnergyConfig as EnergyConfig
from eqx_energy.energy import EnergyModel as EnergyModel
from eqx_energy.policy.energy_sampling import GuidanceConfig as GuidanceConfig
from eqx_energy.policy.energy_sampling import InferenceConfig as InferenceConfig
from eqx_energy.policy.pi0 import Observation as Observation
from eqx_energy.policy.pi0 import Pi0 as Pi0
from eqx_energy.policy.pi0 import Pi0Config as Pi0Config
from eqx_energy.select import SelectionConfig as SelectionConfig
from eqx_energy.select import SelectionTrace as SelectionTrace
