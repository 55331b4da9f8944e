"""A local Ray cluster shared by every test under tests/ray (starting one costs several seconds).

Logical CPUs exceed the 2 physical cores on purpose, so that several small actors fit; each actor
should then pin its own torch threads.
"""

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()
