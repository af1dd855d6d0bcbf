"""Model updates on the device: fetch signed artifacts, verify them, swap them in."""
