"""Guest-physical memory as stored (``ram``): the lowest layer, below debug access, SEV and the walkers."""
