"""Programs that use the library and are never used by it: the toy world (`toy`), `oprd demo`
(`demo`) and `oprd demo --bridge` (`bridge_demo`), the rank study (`bridge_sweep`), the paper's
applications (`applications`), `oprd bench` (`bench`), the real-shape rehearsal (`rehearsal`), the
overlap timing (`overlap`), and what they share: memory probes (`measure`) and a vLLM server (`serving`)."""
