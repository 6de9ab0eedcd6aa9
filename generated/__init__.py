"""Generated cell modules (cellgen build). DO NOT EDIT by hand."""
