"""Toy batches drawn on the device are the host iterator's batches, placed over the mesh."""
import numpy as np

from configs import common
from fdistill import data
from fdistill.parallel import mesh as mesh_lib


def test_device_batches_equal_host_batches_and_are_sharded():
  config = common.base_config()
  config.data.update(dict(name="toy2d", distribution="gmm25", seed=3))
  config.mesh.update(dict(data=-1, fsdp=2))  # 8 fake devices: 4 data x 2 fsdp
  dataset = data.build(config.data)
  mesh = mesh_lib.make_mesh(config.mesh)
  device = dataset.device_batches(16, 5, mesh_lib.batch_sharding(mesh))
  host = dataset.iterator(16, 5)
  for _ in range(3):
    on_device, on_host = next(device), next(host)
    assert on_device["x"].sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(on_device["x"]), on_host["x"])
  # Different steps differ (the step index reaches the key).
  assert not np.array_equal(np.asarray(next(device)["x"]), next(dataset.iterator(16, 5))["x"])
