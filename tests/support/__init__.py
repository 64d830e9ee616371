"""Shared test support: loop devices and mounts (devices), realistic disk
images (disks) and a FUSE-backed disk with bad sectors (faulty)."""
