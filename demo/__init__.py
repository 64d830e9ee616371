"""The demo disk: a disk-image file that `make run` adds to this host's inventory,
so a newcomer can back up and restore without touching a real disk."""
