"""The host's disks: reading a device, its partition table, the inventory with stable disk
ids, what is mounted on what, and which blocks a filesystem uses (used mode)."""
