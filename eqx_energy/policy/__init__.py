"""Pi0 / Pi0.5 in Equinox: SigLIP, the Gemma mixture, the flow-matching policy and its tokenizer.

Functions stay in their modules (`eqx_energy.policy.energy_sampling.sample_actions_with_energy_correction`,
`eqx_energy.policy.tokenizer.train_sentencepiece`); classes are re-exported here.
"""

from eqx_energy.policy.gemma import Gemma as Gemma, GemmaConfig as GemmaConfig
from eqx_energy.policy.pi0 import Observation as Observation, Pi0 as Pi0, Pi0Config as Pi0Config
from eqx_energy.policy.siglip import Siglip as Siglip, SiglipConfig as SiglipConfig
from eqx_energy.policy.tokenizer import PaligemmaTokenizer as PaligemmaTokenizer
