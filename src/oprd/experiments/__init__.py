"""Programs that use the library and are never used by it: the toy world (`toy`), `oprd demo`
(`demo`) and `oprd demo --bridge` (`bridge_demo`), the rank study (`bridge_sweep`), `oprd bench`
(`bench`), and the memory probes they share (`measure`)."""
