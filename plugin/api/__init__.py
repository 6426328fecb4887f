"""The HTTP layer: Flask blueprints that decode a request, call one service method, encode."""
