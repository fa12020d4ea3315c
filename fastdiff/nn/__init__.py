"""nn.Modules over fastdiff ops."""
