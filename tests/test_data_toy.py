"""Toy batches drawn on the device are the host iterator's batches, placed over the mesh."""
import ml_collections
import numpy as np

from fdistill import data
from fdistill.parallel import mesh as mesh_lib


def test_device_batches_equal_host_batches_and_are_sharded():
  dataset = data.build(ml_collections.ConfigDict({"name": "toy2d", "distribution": "gmm25",
                                                  "seed": 3}))
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(  # 8 fake devices: 4 data x 2 fsdp
      {"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1}))
  device = dataset.device_batches(16, 5, mesh_lib.batch_sharding(mesh))
  host = dataset.iterator(16, 5)
  for _ in range(3):
    on_device, on_host = next(device), next(host)
    assert on_device["x"].sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(on_device["x"]), on_host["x"])
  # Different steps differ (the step index reaches the key).
  assert not np.array_equal(np.asarray(next(device)["x"]), next(dataset.iterator(16, 5))["x"])
