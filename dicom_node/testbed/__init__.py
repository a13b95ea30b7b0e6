"""A local test bed: CT-series and phantom writers, local peers (Orthanc, a storage SCP, the
node as a process) and the demo. The demo, the tests and the benchmarks all use it from here."""
