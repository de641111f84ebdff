// kvtierd: the kvtier daemon (the same as `kvtier serve`).
#include <CLI/CLI.hpp>

#include "tools/serve.h"

int main(int argc, char** argv) {
  CLI::App app{"kvtierd: hierarchical KV-cache storage tier service (HBM, host DRAM, NVMe)"};
  kvtier::ServeFlags flags;
  kvtier::add_serve_flags(app, flags);
  CLI11_PARSE(app, argc, argv);
  return kvtier::run_serve(flags);
}
