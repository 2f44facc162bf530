"""Host side: the generic async PF core, guest memory and the backing store."""
