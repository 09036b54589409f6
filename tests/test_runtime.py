"""Process set-up: the local Ray instance recipes start."""

import os
import subprocess
import sys

SCRIPT = """
import ray
from ray.util.state import list_actors
from cytoray.runtime import RayConfig, init_ray

init_ray(RayConfig(num_cpus=1))
ray.get(ray.remote(lambda: 1).remote())
# Ray Train's placement-group cleaner asks the state API whether the controller is alive; it must answer
address = ray.get_runtime_context().gcs_address  # this instance, not another one on the machine
print("STATE_API_OK", isinstance(list_actors(address=address), list))
ray.shutdown()
"""


def test_local_instance_serves_the_state_api_ray_train_needs(ray_local):  # with another instance running
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
    assert "STATE_API_OK True" in out.stdout, out.stderr[-2000:]
