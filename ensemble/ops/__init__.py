"""Running the bundle: build the artifacts, check them (manifest), launch tritonserver, watch its
python stubs, the `feedserve` command line and the demo."""
