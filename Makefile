# SPDX-License-Identifier: BSD-3-Clause
# nbdkit-backupaccess.  GNU make.
#
#   make            build the filter, the library and the man page
#   make deps       install the Debian packages everything needs (as root)
#                   and unpack the QEMU builds the tests run on besides the
#                   system's 7.2 into BACKUPACCESS_DEPS (default .deps):
#                   10.0.2 from bookworm-backports, and the Proxmox VE QEMU
#                   from PVE_QEMU_TARBALL (tests/lib/qemus.py, tests/deps/)
#   make check      unit and integration tests; last line "N passed, N failed"
#   make check-full make check with every variant on every QEMU build
#                   (BACKUPACCESS_FULL=1)
#   make check-package  the Debian packages built in a clean clone, installed,
#                   checked from the installed files alone, removed (as root)
#   make check-asan every unit and integration test (QEMU ones included)
#                   with the filter, plugin, helper and unit tests built with
#                   ASan + UBSan (LeakSanitizer on): no error, no leak of ours
#   make check-valgrind  the unit tests and VALGRIND_TESTS below with nbdkit
#                   (filter, plugin) under valgrind memcheck: no error, no leak
#                   Both build a copy in .san/ and run tests/san/run (how
#                   reports are caught and sorted: see there).
#   make check-provider  the Proxmox VE backup provider's tests (provider/t)
#   make install-provider  the provider's Perl modules (provider/lib) and
#                   its man page, pve-backupaccess-provider(5)
#   make demo       full + incremental backup of a disk in qemu-storage-daemon
#   make bench      throughput and memory figures (ratios within one run)
#   make lint       cppcheck and clang-tidy (.clang-tidy), warnings are errors
#   make fuzz       libFuzzer targets tests/fuzz/fuzz_* (clang); make fuzz-long
#                   runs each for FUZZ_SECONDS (see tests/fuzz/README.md)

# The version, in one place: debian/changelog's first line.
VERSION := $(shell sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog)

CC      ?= gcc
CFLAGS  ?= -O2 -g
WARNFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter
ALL_CFLAGS = $(CFLAGS) $(WARNFLAGS) -std=gnu11 -fPIC -Ilib \
             -DPACKAGE_VERSION='"$(VERSION)"' \
             $(shell pkg-config --cflags nbdkit libnbd json-c)

# Debian packages to build (debian/control's Build-Depends are the same,
# tests/integration/test-debian-control.sh checks it), ...
DEB_BUILD_PACKAGES = build-essential debhelper pkg-config perl \
  nbdkit nbdkit-plugin-dev libnbd-dev libjson-c-dev libcmocka-dev \
  libfuse3-dev
# ... and to test, lint, fuzz, run the demo and the benchmark.
DEB_PACKAGES = $(DEB_BUILD_PACKAGES) \
  libnbd-bin python3-libnbd fuse3 \
  qemu-utils qemu-system-x86 qemu-block-extra procps bc gnutls-bin \
  cppcheck clang-tidy strace valgrind
DEB_PACKAGES += clang libclang-rt-14-dev
# The Proxmox VE QEMU's runtime (its README), and unpacking it.
DEB_PACKAGES += seabios ipxe-qemu libaio1 libfdt1 libfuse3-3 libglib2.0-0 \
  libgnutls30 libnuma1 libpixman-1-0 libpng16-16 libseccomp2 libslirp0 \
  liburing2 libzstd1 libsystemd0 libuuid1 libbz2-1.0 libncursesw6 \
  xz-utils python3 git
# The test guest (tests/lib/guest.py): its initramfs and file system.  Its
# kernel is downloaded and unpacked, not installed: tests/deps/guest-kernel.sh.
DEB_PACKAGES += busybox-static cpio e2fsprogs

LIB_SRCS   = lib/regions.c lib/mapfile.c lib/coverage.c lib/discardq.c lib/view.c \
             lib/status.c \
             lib/bitmap.c lib/qmp.c lib/statefile.c lib/cluster.c lib/size.c \
             lib/upstream.c lib/copy.c
LIB_HDRS   = $(wildcard lib/*.h)
LIB_OBJS   = $(LIB_SRCS:.c=.o)
LIB        = lib/libbackupaccess.a
FILTER     = nbdkit-backupaccess-filter.so
FILTER_SRCS = $(wildcard filter/*.c)
FILTER_HDRS = $(wildcard filter/*.h)
FILTER_OBJS = $(FILTER_SRCS:.c=.o)
PLUGIN     = nbdkit-snapshotaccess-plugin.so
HELPER     = helper/backupaccess-helper
HELPER_SRCS = $(wildcard helper/*.c)
HELPER_HDRS = $(wildcard helper/*.h)
HELPER_OBJS = $(HELPER_SRCS:.c=.o)
COPY       = copy/backupaccess-copy
COPY_SRCS  = $(wildcard copy/*.c)
COPY_HDRS  = $(wildcard copy/*.h)
COPY_OBJS  = $(COPY_SRCS:.c=.o)
MOUNT      = mount/backupaccess-mount
MOUNT_SRCS = $(wildcard mount/*.c)
MOUNT_HDRS = $(wildcard mount/*.h)
MOUNT_OBJS = $(MOUNT_SRCS:.c=.o)
MANPAGE    = nbdkit-backupaccess-filter.1 nbdkit-snapshotaccess-plugin.1 \
             backupaccess-helper.1 backupaccess-copy.1 backupaccess-mount.1
# The provider's page, installed with it (make install-provider).
PROVIDER_MANPAGE = provider/pve-backupaccess-provider.5
UNIT_SRCS  = $(wildcard tests/unit/test_*.c)
UNIT_TESTS = $(UNIT_SRCS:.c=)


.PHONY: all deps print-build-deps install uninstall check-package check check-full check-asan check-valgrind unit-tests demo bench \
        clean lint fuzz fuzz-long install-provider uninstall-provider check-provider

all: $(LIB) $(FILTER) $(PLUGIN) $(HELPER) $(COPY) $(MOUNT) $(MANPAGE) \
     $(PROVIDER_MANPAGE)

deps:
	@tests/deps/packages $(DEB_PACKAGES)
	@tests/deps/unpack-qemus
	@tests/deps/guest-kernel.sh

lib/%.o: lib/%.c $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

# Hidden: the filter's units see each other's functions, nbdkit sees
# only what is NBDKIT_DLL_PUBLIC (filter_init, the debug flag).
filter/%.o: filter/%.c $(FILTER_HDRS) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -fvisibility=hidden -c $< -o $@

$(FILTER): $(FILTER_OBJS) $(LIB)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -shared -o $@ $(FILTER_OBJS) \
	  $(LIB) $(shell pkg-config --libs libnbd json-c) -lpthread

$(PLUGIN): plugin/snapshotaccess.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -shared -o $@ plugin/snapshotaccess.c \
	  $(LIB) $(shell pkg-config --libs libnbd) -lpthread

helper/%.o: helper/%.c $(HELPER_HDRS) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(HELPER): $(HELPER_OBJS) $(LIB)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $(HELPER_OBJS) \
	  $(LIB) $(shell pkg-config --libs libnbd json-c)

copy/%.o: copy/%.c $(COPY_HDRS) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(COPY): $(COPY_OBJS) $(LIB)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $(COPY_OBJS) \
	  $(LIB) $(shell pkg-config --libs libnbd json-c) -lpthread

mount/%.o: mount/%.c $(MOUNT_HDRS) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) $(shell pkg-config --cflags fuse3) -c $< -o $@

$(MOUNT): $(MOUNT_OBJS) $(LIB)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $(MOUNT_OBJS) \
	  $(LIB) $(shell pkg-config --libs fuse3 libnbd json-c) -lpthread

# @VERSION@ in a page becomes the version; the section is the suffix.
POD2MAN = podchecker $< && \
	sed 's/@VERSION@/$(VERSION)/g' $< | pod2man --section=$(subst .,,$(suffix $@)) \
	  --center="nbdkit-backupaccess" \
	  --release="nbdkit-backupaccess $(VERSION)" --name=$(notdir $*) > $@
%.1: %.pod debian/changelog
	$(POD2MAN)
%.5: %.pod debian/changelog
	$(POD2MAN)

tests/unit/%: tests/unit/%.c $(LIB) $(LIB_HDRS)
	$(CC) $(ALL_CFLAGS) -o $@ $< $(LIB) $(shell pkg-config --libs cmocka libnbd json-c)

# The helper's typed state, with the helper units it needs.
HELPER_STATE_OBJS = helper/state.o helper/util.o helper/rundir.o
tests/unit/test_helper_state: tests/unit/test_helper_state.c \
                              $(HELPER_STATE_OBJS) $(LIB) $(HELPER_HDRS)
	$(CC) $(ALL_CFLAGS) -Ihelper -o $@ $< $(HELPER_STATE_OBJS) $(LIB) \
	  $(shell pkg-config --libs cmocka libnbd json-c)

# How the helper finds a Proxmox VE backup access's devices.
HELPER_PVE_OBJS = helper/proxmox-devices.o helper/qmpops.o helper/util.o
tests/unit/test_helper_pvedevices: tests/unit/test_helper_pvedevices.c \
                                   $(HELPER_PVE_OBJS) $(LIB) $(HELPER_HDRS)
	$(CC) $(ALL_CFLAGS) -Ihelper -o $@ $< $(HELPER_PVE_OBJS) $(LIB) \
	  $(shell pkg-config --libs cmocka libnbd json-c)

unit-tests: $(UNIT_TESTS)

check: deps
	$(MAKE) all unit-tests fuzz
	tests/run-tests

# make check with every variant on every QEMU build (the incremental
# matrix's every cluster x granularity pair on 10.0.2 too, not only on
# 7.2): about twice as long.
check-full: deps
	BACKUPACCESS_FULL=1 $(MAKE) check

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

C_SOURCES = $(LIB_SRCS) $(FILTER_SRCS) plugin/snapshotaccess.c \
            $(COPY_SRCS) $(MOUNT_SRCS) \
            $(HELPER_SRCS) $(wildcard tests/fuzz/fuzz_*.c)

lint:
	cppcheck --quiet --enable=warning,performance,portability \
	  --error-exitcode=1 -Ilib $(C_SOURCES)
	clang-tidy --quiet --warnings-as-errors='*' $(C_SOURCES) -- \
	  -std=gnu11 -Ilib -Ihelper -DPACKAGE_VERSION='"$(VERSION)"' \
	  $(shell pkg-config --cflags json-c fuse3)

# libFuzzer targets, built with clang apart from the gcc build: the
# library sources are compiled into each one (not lib/*.o).
FUZZ_CC      = clang
FUZZ_CFLAGS  = -g -O1 -fsanitize=fuzzer,address,undefined \
               -fno-sanitize-recover=undefined -std=gnu11 -Ilib \
               $(shell pkg-config --cflags json-c)
FUZZ_LIBSRCS = $(filter-out lib/bitmap.c lib/upstream.c lib/copy.c,$(LIB_SRCS))
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
	rm -f lib/*.o filter/*.o helper/*.o copy/*.o mount/*.o $(LIB) $(FILTER) $(PLUGIN) $(HELPER) $(COPY) $(MOUNT) $(MANPAGE) $(PROVIDER_MANPAGE) $(UNIT_TESTS) bench/coverage-memory
	rm -f $(FUZZERS)
	rm -rf .san

print-build-deps:
	@echo $(DEB_BUILD_PACKAGES)

# make install [PREFIX=/usr/local] [DESTDIR=...]: the filter and the
# plugin into nbdkit's own directories (so that nbdkit finds them by
# name), the programs into PREFIX/bin, the man pages into section 1.
PREFIX           ?= /usr/local
BINDIR           ?= $(PREFIX)/bin
MANDIR           ?= $(PREFIX)/share/man
NBDKIT_FILTERDIR ?= $(shell pkg-config --variable=filterdir nbdkit)
NBDKIT_PLUGINDIR ?= $(shell pkg-config --variable=plugindir nbdkit)
INSTALLED = $(NBDKIT_FILTERDIR)/$(FILTER) $(NBDKIT_PLUGINDIR)/$(PLUGIN) \
            $(BINDIR)/$(notdir $(HELPER)) $(BINDIR)/$(notdir $(COPY)) \
            $(BINDIR)/$(notdir $(MOUNT)) \
            $(addprefix $(MANDIR)/man1/,$(MANPAGE))

install: all
	install -d $(DESTDIR)$(NBDKIT_FILTERDIR) $(DESTDIR)$(NBDKIT_PLUGINDIR) \
	  $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1
	install -m 0644 $(FILTER) $(DESTDIR)$(NBDKIT_FILTERDIR)/
	install -m 0644 $(PLUGIN) $(DESTDIR)$(NBDKIT_PLUGINDIR)/
	install -m 0755 $(HELPER) $(COPY) $(MOUNT) $(DESTDIR)$(BINDIR)/
	install -m 0644 $(MANPAGE) $(DESTDIR)$(MANDIR)/man1/

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))

# make install-provider [DESTDIR=...]: the Proxmox VE storage plugin and
# backup provider into Perl's vendor directory, where pve-storage loads
# PVE/Storage/Custom/*.pm from (on the Proxmox VE host, with make install),
# and its man page into section 5.
PERL5DIR    ?= /usr/share/perl5
PROVIDER_PM  = $(shell cd provider/lib && find PVE -name '*.pm' | sort)

install-provider: $(PROVIDER_MANPAGE)
	for f in $(PROVIDER_PM); do \
	  install -D -m 0644 provider/lib/$$f $(DESTDIR)$(PERL5DIR)/$$f || exit 1; \
	done
	install -D -m 0644 $(PROVIDER_MANPAGE) \
	  $(DESTDIR)$(MANDIR)/man5/$(notdir $(PROVIDER_MANPAGE))

uninstall-provider:
	rm -f $(addprefix $(DESTDIR)$(PERL5DIR)/,$(PROVIDER_PM))
	rm -f $(DESTDIR)$(MANDIR)/man5/$(notdir $(PROVIDER_MANPAGE))
	-rmdir $(DESTDIR)$(PERL5DIR)/PVE/BackupProvider/Plugin/BackupAccess

check-provider: all
	tests/run-tests test-provider

# Builds the Debian package in a clean clone, installs it, checks the
# installed files, removes it (root; CI runs it).
check-package:
	tests/package/check-package.sh
