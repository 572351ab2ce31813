"""One logical step, as a straight line: ``clip_batch`` per physical batch, then ``release``."""
