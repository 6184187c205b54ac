#!/usr/bin/env node
import { main } from '../dist/src/cli.js';

main(process.argv.slice(2)).catch((e) => {
  process.stderr.write(`\nconvmae: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exit(1);
});
