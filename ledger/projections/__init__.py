"""Read models derived from the store alone: the bot registry, portals, the deletion timeline."""
