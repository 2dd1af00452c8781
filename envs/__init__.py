"""LIBERO as gymnasium environments. `import envs` registers "libero/Libero-v0".

No torch here, and robosuite/MuJoCo are imported only when an environment is built.
"""

import gymnasium as gym

from envs.suites import SUITES, get_suite

ENV_ID = "libero/Libero-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.libero:LiberoEnv")

__all__ = ["ENV_ID", "SUITES", "get_suite"]
