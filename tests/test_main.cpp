#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

// Catch's own main, plus one rule for every run: a test case or section that checks nothing
// fails (Catch2 v2 takes --warn once, and ctest passes --warn NoTests). A deliberate skip says
// SUCCEED("skipped") after its WARN.
int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int bad = session.applyCommandLine(argc, argv); bad != 0) return bad;
  session.configData().warnings =
      static_cast<Catch::WarnAbout::What>(session.configData().warnings | Catch::WarnAbout::NoAssertions);
  return session.run();
}
