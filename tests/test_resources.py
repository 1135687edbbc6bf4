"""Resource planning of the scoring engine against a real local Ray."""

import pytest
import ray

from fiqa.config import ConfigError, LabelConfig
from fiqa.labeling import resolve_resources


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_pool_that_would_starve_decoding_is_refused(two_cpu_ray):
    with pytest.raises(ConfigError, match="starve"):
        resolve_resources(LabelConfig(concurrency=2, num_cpus=1, decode_cpus=1), with_model=True)


def test_gpus_per_actor_follow_the_cluster(two_cpu_ray, caplog):
    assert resolve_resources(LabelConfig(), with_model=True).num_gpus == 0.0
    # GPUs the cluster lacks now only warn: an autoscaler (KubeRay) may add GPU nodes.
    with caplog.at_level("WARNING", logger="fiqa.labeling"):
        cfg = resolve_resources(
            LabelConfig(num_gpus=1.0, num_cpus=0.25, concurrency=[1, 4]), with_model=True
        )
    assert cfg.num_gpus == 1.0 and "up to 4 actor(s) x 1 GPU" in caplog.text


def test_an_autoscaling_pool_is_planned_by_its_maximum(two_cpu_ray):
    with pytest.raises(ConfigError, match="2 actor"):
        resolve_resources(LabelConfig(concurrency=[1, 2], num_cpus=1), with_model=True)


def test_without_a_model_only_decoding_needs_cpus(two_cpu_ray):
    cfg = resolve_resources(LabelConfig(concurrency=4, num_cpus=1, decode_cpus=2), with_model=False)
    assert cfg.decode_cpus == 2
