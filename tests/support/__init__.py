"""Shared test support: loop devices and mounts (devices), realistic disk
images (disks), a FUSE-backed disk with bad sectors (faulty), and what a test
does when the machine lacks one of them (requirements: skip, or fail under CI)."""
