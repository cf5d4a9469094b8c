"""How ``sd35 serve`` flags become Ray Serve's options, and the shipped Serve config (deploy/ray-serve.yaml)
as Ray reads it; nothing here starts Ray (tests/server/test_ray.py does)."""

from __future__ import annotations

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from sd35.cli.serve_setup import parse_serve_args
from sd35.errors import InvalidRequest, SD35Error
from sd35.server import ray_app
from tests.server.server_helpers import REPO


def options(*argv: str, gpus: float = 0.0) -> dict:
    return ray_app.deployment_options(parse_serve_args(list(argv)), gpus)


def test_replicas_hold_a_gpu_each_where_there_are_gpus_and_cpus_elsewhere():
    cpu = options("--replicas", "3")
    assert cpu["num_replicas"] == 3 and "autoscaling_config" not in cpu
    assert cpu["ray_actor_options"] == {"num_gpus": 0.0, "num_cpus": 1.0}
    gpu = options("--replicas", "4", gpus=8)
    assert gpu["ray_actor_options"]["num_gpus"] == 1.0
    assert options("--gpus-per-replica", "0.5", gpus=8)["ray_actor_options"]["num_gpus"] == 0.5
    assert options("--gpus-per-replica", "2", gpus=0)["ray_actor_options"]["num_gpus"] == 2.0


def test_back_pressure_is_429_with_retry_after_and_follows_the_server_flags():
    o = options("--batch-rows", "4", "--queue-limit", "20")
    assert o["max_ongoing_requests"] == 4 and o["max_queued_requests"] == 20
    assert o["backpressure_config"]["status_code"] == 429 and o["backpressure_config"]["retry_after_s"] > 0
    o = options("--max-ongoing-requests", "2", "--max-queued-requests", "5")
    assert o["max_ongoing_requests"] == 2 and o["max_queued_requests"] == 5


def test_autoscaling_between_min_and_max():
    o = options("--min-replicas", "1", "--max-replicas", "6", "--replicas", "2")
    assert "num_replicas" not in o
    assert o["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "initial_replicas": 2,
        "target_ongoing_requests": 4,
    }
    assert options("--max-replicas", "3")["autoscaling_config"]["min_replicas"] == 1
    for bad in (["--min-replicas", "4", "--max-replicas", "2"], ["--replicas", "0"]):
        with pytest.raises(SD35Error) as info:
            options(*bad)
        assert info.value.param in ("max_replicas", "replicas")


def test_the_shipped_serve_config_is_valid_and_its_args_are_sd35_serve_flags():
    config = yaml.safe_load((REPO / "deploy" / "ray-serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "sd35.server.ray_app:app"
    (deployment,) = app.deployments
    assert deployment.name == ray_app.DEPLOYMENT
    assert deployment.backpressure_config.status_code == 429
    parsed = parse_serve_args(ray_app._argv(app.args))
    assert parsed.jobs_db.startswith("postgresql://") and parsed.gpus_per_replica == 1
    assert str(parsed.data_dir) == "/shared/sd35"


def test_the_application_builder_takes_flags_and_refuses_unknown_ones():
    built = ray_app.app({"replicas": 2, "no_batching": True, "lora": ["a.safetensors", "b.safetensors:0.5"]})
    assert isinstance(built, Application)
    assert ray_app._argv({"no_batching": True, "lora": ["a", "b"], "model": None, "insecure": False}) == [
        "--no-batching", "--lora", "a", "--lora", "b",
    ]  # fmt: skip
    with pytest.raises(InvalidRequest) as info:
        ray_app.app({"no_such_flag": 1})
    assert "--no-such-flag" in info.value.message
