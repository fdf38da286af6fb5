# nbdkit-backupaccess.  GNU make.
#
#   make            build the filter, the library and the man page
#   make deps       install the Debian packages everything needs (as root)
#                   and unpack the QEMU builds the tests run on besides the
#                   system's 7.2 into BACKUPACCESS_DEPS (default .deps):
#                   10.0.2 from bookworm-backports, and the Proxmox VE QEMU
#                   from PVE_QEMU_TARBALL (tests/lib/qemus.py, tests/deps/)
#   make check      unit and integration tests; last line "N passed, N failed"
#   make check-asan every unit and integration test (QEMU ones included)
#                   with the filter, plugin, helper and unit tests built with
#                   ASan + UBSan (LeakSanitizer on): no error, no leak of ours
#   make check-valgrind  the unit tests and VALGRIND_TESTS below with nbdkit
#                   (filter, plugin) under valgrind memcheck: no error, no leak
#                   Both build a copy in .san/ and run tests/san/run (how
#                   reports are caught and sorted: see there).
#   make demo       full + incremental backup of a disk in qemu-storage-daemon
#   make bench      throughput and memory figures (ratios within one run)
#   make lint       cppcheck and clang-tidy (.clang-tidy), warnings are errors
#   make fuzz       libFuzzer targets tests/fuzz/fuzz_* (clang); make fuzz-long
#                   runs each for FUZZ_SECONDS (see tests/fuzz/README.md)

CC      ?= gcc
CFLAGS  ?= -O2 -g
WARNFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter
ALL_CFLAGS = $(CFLAGS) $(WARNFLAGS) -std=gnu11 -fPIC -Ilib \
             $(shell pkg-config --cflags nbdkit libnbd json-c fuse3)

# Debian packages for building, testing, the demo and the benchmark.
DEB_PACKAGES = build-essential pkg-config perl \
  nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd \
  libjson-c-dev libfuse3-dev fuse3 libcmocka-dev \
  qemu-utils qemu-system-x86 qemu-block-extra procps bc gnutls-bin \
  cppcheck clang-tidy strace valgrind
DEB_PACKAGES += clang libclang-rt-14-dev
# The Proxmox VE QEMU's runtime (its README), and unpacking it.
DEB_PACKAGES += seabios ipxe-qemu libaio1 libfdt1 libfuse3-3 libglib2.0-0 \
  libgnutls30 libnuma1 libpixman-1-0 libpng16-16 libseccomp2 libslirp0 \
  liburing2 libzstd1 libsystemd0 libuuid1 libbz2-1.0 libncursesw6 \
  xz-utils python3 git

LIB_SRCS   = lib/regions.c lib/mapfile.c lib/coverage.c lib/discardq.c \
             lib/bitmap.c lib/qmp.c lib/statefile.c lib/cluster.c
LIB_HDRS   = $(wildcard lib/*.h)
LIB_OBJS   = $(LIB_SRCS:.c=.o)
LIB        = lib/libbackupaccess.a
FILTER     = nbdkit-backupaccess-filter.so
PLUGIN     = nbdkit-backupaccess-plugin.so
HELPER     = helper/backupaccess-helper
MANPAGE    = nbdkit-backupaccess.1 backupaccess-helper.1
UNIT_SRCS  = $(wildcard tests/unit/test_*.c)
UNIT_TESTS = $(UNIT_SRCS:.c=)

.PHONY: all deps check check-asan check-valgrind unit-tests demo bench \
        clean lint fuzz fuzz-long

all: $(LIB) $(FILTER) $(PLUGIN) $(HELPER) $(MANPAGE)

deps:
	@tests/deps/packages $(DEB_PACKAGES)
	@tests/deps/unpack-qemus

lib/%.o: lib/%.c $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

$(FILTER): filter/backupaccess.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -shared -o $@ filter/backupaccess.c \
	  $(LIB) $(shell pkg-config --libs libnbd json-c) -lpthread

$(PLUGIN): plugin/backupaccess-plugin.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -shared -o $@ plugin/backupaccess-plugin.c \
	  $(LIB) $(shell pkg-config --libs libnbd) -lpthread

$(HELPER): helper/backupaccess-helper.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -o $@ helper/backupaccess-helper.c \
	  $(LIB) $(shell pkg-config --libs libnbd json-c)

%.1: %.pod
	podchecker $<
	pod2man --section=1 --center="nbdkit-backupaccess" \
	  --release="nbdkit-backupaccess" --name=$* $< > $@

tests/unit/%: tests/unit/%.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -o $@ $< $(LIB) $(shell pkg-config --libs cmocka libnbd json-c)

unit-tests: $(UNIT_TESTS)

check: deps
	$(MAKE) all unit-tests fuzz
	tests/run-tests

check-asan: deps
	tests/san/run asan

# Under valgrind each nbdkit start costs seconds and the work 20-50 times
# more, so not every test runs: the unit tests (all) and a set that goes
# through every part of the filter and the plugin -- reads and trims of a
# full backup (test-full-backup), a map file (test-read-map), parallel
# connections (test-parallel), trim batching (test-trim-batch), the
# bitmap fetched from a real QEMU with discards reaching it
# (test-qemu-discard), and the plugin over QEMU with multi-conn and QEMU
# killed (test-qemu-plugin).  Not here: the helper's tests (it checks that
# its nbdkit is named "nbdkit"; under valgrind it is "memcheck-amd64-"),
# the many failing start-ups of test-bad-input (minutes under valgrind),
# and the rest; check-asan runs them all.
VALGRIND_TESTS = tests/unit/ test-full-backup test-read-map test-parallel \
  test-trim-batch test-qemu-discard test-qemu-plugin

check-valgrind: deps
	tests/san/run valgrind $(VALGRIND_TESTS)

demo: deps
	$(MAKE) all
	demo/demo.py

bench/coverage-memory: bench/coverage-memory.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -o $@ $< $(LIB)

bench: deps
	$(MAKE) all bench/coverage-memory
	bench/bench.sh

C_SOURCES = $(LIB_SRCS) filter/backupaccess.c plugin/backupaccess-plugin.c \
            helper/backupaccess-helper.c $(wildcard tests/fuzz/fuzz_*.c)

lint:
	cppcheck --quiet --enable=warning,performance,portability \
	  --error-exitcode=1 -Ilib $(C_SOURCES)
	clang-tidy --quiet --warnings-as-errors='*' $(C_SOURCES) -- \
	  -std=gnu11 -Ilib $(shell pkg-config --cflags json-c)

# libFuzzer targets, built with clang apart from the gcc build: the
# library sources are compiled into each one (not lib/*.o).
FUZZ_CC      = clang
FUZZ_CFLAGS  = -g -O1 -fsanitize=fuzzer,address,undefined \
               -fno-sanitize-recover=undefined -std=gnu11 -Ilib \
               $(shell pkg-config --cflags json-c)
FUZZ_LIBSRCS = $(filter-out lib/bitmap.c,$(LIB_SRCS))
FUZZERS      = $(patsubst %.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_SECONDS ?= 600

tests/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(FUZZ_LIBSRCS) \
                   $(LIB_HDRS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $< $(FUZZ_LIBSRCS) \
	  $(shell pkg-config --libs json-c)

fuzz: $(FUZZERS)

fuzz-long: fuzz
	FUZZ_SECONDS=$(FUZZ_SECONDS) tests/integration/test-fuzz.sh

clean:
	rm -f lib/*.o $(LIB) $(FILTER) $(PLUGIN) $(HELPER) $(MANPAGE) $(UNIT_TESTS) bench/coverage-memory
	rm -f $(FUZZERS)
	rm -rf .san
