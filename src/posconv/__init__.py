"""posconv: where-aware convolutions (coordinate bias, CoordConv) and the study around them."""
