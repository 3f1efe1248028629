from fixtures_mcore import *  # noqa: F403  (megatron-core checkpoint fixtures, built once per session)
