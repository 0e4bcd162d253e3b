"""API tests: an in-process grpc.aio server driven through the generated stubs."""
