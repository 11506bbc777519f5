"""Developer tools for cd_convert (not installed with the package, not run by the default test suite)."""
