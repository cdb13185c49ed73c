//! Assembles the built-in guest programs with `iced-x86` (no external
//! assembler) and writes them, with the addresses of the labels the host-side
//! verifier needs, to `$OUT_DIR/guest_programs.rs`.

use std::fmt::Write as _;
use std::path::PathBuf;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

#[allow(dead_code)]
mod abi {
    include!("src/guest/abi.rs");
}
use abi::*;

type BuildResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Labels of the long-mode program whose addresses the verifier needs.
struct LongModeProgram {
    code: Vec<u8>,
    pass_top: u64,
    pass_counted: u64,
    range_top: u64,
}

/// The long-mode pattern program, shared by every vCPU.
///
/// Registers on entry (set by the VMM): `r8` = this vCPU's range table,
/// `r10` = passes completed (0), `r11` = `PATTERN_K`, `rdi` = start of the
/// first range, `r12` = pages written (0), `rsp` = top of its stack, DF clear.
///
/// Invariant at every instruction boundary, which the host verifier relies
/// on: with `c = align_up(rdi, 4096)`, every page of the share below `c` holds
/// `value(r10 + 1)` and every page at or above holds `value(r10)`, except that
/// when `c` is the end of the last range the pass is complete: the pages hold
/// `value(r10 + 1)` if RIP is outside `[pass_counted, range_top]` (r10 not yet
/// incremented) and `value(r10)` inside it. And the counter word `[rsp - 8]`
/// holds `r12`, or `r12 - 1` between the increment of `r12` and the
/// `cmpxchg` that checks and stores it in one instruction (it starts zero, as
/// `r12` does), so a word of a later instant than the registers is reported
/// at the guest's next page.
fn long_mode_program() -> BuildResult<LongModeProgram> {
    let mut a = CodeAssembler::new(64)?;
    let mut pass_end = a.create_label();
    let mut pass_counted = a.create_label();
    let mut pass_top = a.create_label();
    let mut mask_ready = a.create_label();
    let mut range_top = a.create_label();
    let mut page_loop = a.create_label();
    let mut store = a.create_label();
    let mut mismatch = a.create_label();
    let mut no_report = a.create_label();
    let mut counter_ok = a.create_label();
    let mut counter_mismatch = a.create_label();

    // End of a pass: count it, report it, fall through into the next pass.
    a.set_label(&mut pass_end)?;
    a.inc(r10)?;
    a.set_label(&mut pass_counted)?;
    a.mov(eax, r10d)?;
    a.out(u32::from(PROGRESS_PORT), eax)?;

    // Start of a pass: r13 = old pattern base, r14 = new pattern base,
    // r15 = mask that is 0 in pass 0 (memory starts zeroed) and all ones after.
    a.set_label(&mut pass_top)?;
    a.mov(r13, r10)?;
    a.imul_2(r13, r11)?;
    a.lea(r14, qword_ptr(r13 + r11))?;
    a.xor(r15d, r15d)?;
    a.test(r10, r10)?;
    a.jz(mask_ready)?;
    a.not(r15)?;
    a.set_label(&mut mask_ready)?;
    a.mov(rsi, r8)?;

    // One range of the share: [rdi, r9).
    a.set_label(&mut range_top)?;
    a.mov(rdi, qword_ptr(rsi))?;
    a.mov(r9, qword_ptr(rsi + 8))?;

    // One page: check the word written in the previous pass, write the next.
    a.set_label(&mut page_loop)?;
    a.mov(rdx, r13)?;
    a.xor(rdx, rdi)?;
    a.and(rdx, r15)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.cmp(rax, rdx)?;
    a.jne(mismatch)?;
    a.set_label(&mut store)?;
    a.mov(rax, r14)?;
    a.xor(rax, rdi)?;
    // The commit point: stores the word and advances rdi in one instruction.
    a.stosq()?;
    a.add(rdi, (GUEST_PAGE_SIZE - 8) as i32)?;
    // Fine-grained progress: r12 counts pages written since boot; every
    // PAGES_REPORT_INTERVAL pages its low 32 bits go out on PAGES_PORT.
    a.inc(r12)?;
    // The counter word, a copy of r12 at the top of this vCPU's stack page,
    // so that registers and memory saved at one instant (a switchover, a
    // checkpoint) must agree on it: check it held r12 - 1 and store r12 in
    // one instruction, so that no stop falls between the check and the store.
    a.lea(rax, qword_ptr(r12 - 1))?;
    a.mov(rdx, rax)?;
    a.cmpxchg(qword_ptr(rsp - 8), r12)?;
    a.jne(counter_mismatch)?;
    a.set_label(&mut counter_ok)?;
    a.test(r12d, (PAGES_REPORT_INTERVAL - 1) as i32)?;
    a.jnz(no_report)?;
    a.mov(eax, r12d)?;
    a.out(u32::from(PAGES_PORT), eax)?;
    a.set_label(&mut no_report)?;
    a.cmp(rdi, r9)?;
    a.jb(page_loop)?;
    a.add(rsi, 16)?;
    a.cmp(qword_ptr(rsi), 0)?;
    a.jne(range_top)?;
    a.jmp(pass_end)?;

    // Report the bad page (rdi), expected (rdx) and found (rax), then repair it.
    a.set_label(&mut mismatch)?;
    a.out(u32::from(ERROR_PORT), al)?;
    a.jmp(store)?;

    // Report the counter word (expected in rdx, found in rax), then repair it.
    a.set_label(&mut counter_mismatch)?;
    a.out(u32::from(COUNTER_ERROR_PORT), al)?;
    a.mov(qword_ptr(rsp - 8), r12)?;
    a.jmp(counter_ok)?;

    let result = a.assemble_options(LM_CODE_ADDR, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let program = LongModeProgram {
        pass_top: result.label_ip(&pass_top)?,
        pass_counted: result.label_ip(&pass_counted)?,
        range_top: result.label_ip(&range_top)?,
        code: result.inner.code_buffer.clone(),
    };
    if program.code.len() as u64 > GUEST_PAGE_SIZE {
        return Err("long-mode program larger than one page".into());
    }
    Ok(program)
}

const MSG_REAL: &[u8] = b"real mode ok\r\n\0";
const MSG_PROT: &[u8] = b"protected mode ok\r\n\0";
const MSG_BAD_DL: &[u8] = b"bad dl\r\n\0";
const MSG_A20: &[u8] = b"a20 off\r\n\0";

/// The data block of the test boot sector: GDT, GDT descriptor, messages.
struct BootData {
    bytes: Vec<u8>,
    gdt_desc: u64,
    msg_real: u64,
    msg_prot: u64,
    msg_bad_dl: u64,
    msg_a20: u64,
}

fn boot_data() -> BootData {
    let mut bytes = Vec::new();
    // Flat GDT: null, 32-bit code (0x08), 32-bit data (0x10).
    for entry in [0u64, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff] {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    let gdt_desc = TEST_BOOT_DATA_ADDR + bytes.len() as u64;
    bytes.extend_from_slice(&(3u16 * 8 - 1).to_le_bytes());
    bytes.extend_from_slice(&(TEST_BOOT_DATA_ADDR as u32).to_le_bytes());
    let mut place = |msg: &[u8]| {
        let at = TEST_BOOT_DATA_ADDR + bytes.len() as u64;
        bytes.extend_from_slice(msg);
        at
    };
    let msg_real = place(MSG_REAL);
    let msg_prot = place(MSG_PROT);
    let msg_bad_dl = place(MSG_BAD_DL);
    let msg_a20 = place(MSG_A20);
    BootData { bytes, gdt_desc, msg_real, msg_prot, msg_bad_dl, msg_a20 }
}

/// Emits a loop that prints the NUL-terminated string at `[si]`/`[esi]` on
/// the 16550 at 0x3f8, polling the line status register.
fn emit_print(a: &mut CodeAssembler, next: &mut CodeLabel) -> BuildResult<()> {
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(next)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(done)?;
    a.mov(bl, al)?;
    a.mov(dx, 0x3fd)?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(wait)?;
    a.mov(al, bl)?;
    a.mov(dx, 0x3f8)?;
    a.out(dx, al)?;
    a.jmp(*next)?;
    a.set_label(&mut done)?;
    Ok(())
}

/// A PC boot sector that prints over serial in real mode, checks DL = 0x80,
/// enables A20 through port 0x92, switches to 32-bit protected mode, writes
/// a marker word at 1 MiB, prints again and halts.
fn test_boot_sector() -> BuildResult<Vec<u8>> {
    let data = boot_data();

    let mut a = CodeAssembler::new(16)?;
    let mut dl_ok = a.create_label();
    let mut a20_ok = a.create_label();
    let mut print16 = a.create_label();
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, BOOT_SECTOR_ADDR as i32)?;
    a.cld()?;
    a.cmp(dl, 0x80)?;
    a.je(dl_ok)?;
    a.mov(si, data.msg_bad_dl as i32)?;
    a.call(print16)?;
    a.set_label(&mut dl_ok)?;
    a.mov(si, data.msg_real as i32)?;
    a.call(print16)?;
    // Fast A20: set bit 1 of System Control Port A, never bit 0 (reset).
    a.in_(al, 0x92)?;
    a.or(al, 2)?;
    a.and(al, 0xfe_u32 as i32)?;
    a.out(0x92, al)?;
    a.in_(al, 0x92)?;
    a.test(al, 2)?;
    a.jnz(a20_ok)?;
    a.mov(si, data.msg_a20 as i32)?;
    a.call(print16)?;
    a.set_label(&mut a20_ok)?;
    a.lgdt(ptr(data.gdt_desc))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.jmp_far(0x08, TEST_BOOT_PM_ADDR as u32)?;
    emit_print(&mut a, &mut print16)?;
    a.ret()?;
    let real = a.assemble(BOOT_SECTOR_ADDR)?;

    let mut b = CodeAssembler::new(32)?;
    let mut halt = b.create_label();
    b.mov(ax, 0x10)?;
    b.mov(ds, ax)?;
    b.mov(es, ax)?;
    b.mov(ss, ax)?;
    b.mov(esp, BOOT_SECTOR_ADDR as i32)?;
    b.mov(dword_ptr(TEST_BOOT_MARKER_ADDR as u32), TEST_BOOT_MARKER as i32)?;
    b.mov(esi, data.msg_prot as i32)?;
    let mut print32 = b.create_label();
    emit_print(&mut b, &mut print32)?;
    b.cli()?;
    b.set_label(&mut halt)?;
    b.hlt()?;
    b.jmp(halt)?;
    let prot = b.assemble(TEST_BOOT_PM_ADDR)?;

    let pm_off = (TEST_BOOT_PM_ADDR - BOOT_SECTOR_ADDR) as usize;
    let data_off = (TEST_BOOT_DATA_ADDR - BOOT_SECTOR_ADDR) as usize;
    if real.len() > pm_off || pm_off + prot.len() > data_off || data_off + data.bytes.len() > 510 {
        return Err("test boot sector does not fit in 510 bytes".into());
    }
    let mut sector = vec![0u8; 512];
    sector[..real.len()].copy_from_slice(&real);
    sector[pm_off..pm_off + prot.len()].copy_from_slice(&prot);
    sector[data_off..data_off + data.bytes.len()].copy_from_slice(&data.bytes);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    Ok(sector)
}

fn bytes_literal(bytes: &[u8]) -> String {
    let mut s = String::from("[");
    for (i, b) in bytes.iter().enumerate() {
        if i % 16 == 0 {
            s.push_str("\n    ");
        }
        let _ = write!(s, "0x{b:02x}, ");
    }
    s.push_str("\n]");
    s
}

fn main() -> BuildResult<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/guest/abi.rs");

    let lm = long_mode_program()?;
    let boot = test_boot_sector()?;

    let mut out = String::new();
    out.push_str("// @generated by build.rs from the iced-x86 assembly there.\n");
    let _ = writeln!(
        out,
        "/// Machine code of the long-mode pattern program (loaded at `LM_CODE_ADDR`).\npub const LM_CODE: &[u8] = &{};",
        bytes_literal(&lm.code)
    );
    let _ = writeln!(out, "/// Entry point: start of a pass.\npub const LM_PASS_TOP: u64 = 0x{:x};", lm.pass_top);
    let _ = writeln!(
        out,
        "/// First instruction after the pass counter is incremented.\npub const LM_PASS_COUNTED: u64 = 0x{:x};",
        lm.pass_counted
    );
    let _ = writeln!(out, "/// Loads the next range's bounds.\npub const LM_RANGE_TOP: u64 = 0x{:x};", lm.range_top);
    let _ = writeln!(
        out,
        "/// The test boot sector image (512 bytes, signature included).\npub const TEST_BOOT_SECTOR: [u8; 512] = {};",
        bytes_literal(&boot)
    );
    let _ = writeln!(
        out,
        "/// Serial output the test boot sector produces when all goes well.\npub const TEST_BOOT_EXPECTED_SERIAL: &str = {:?};",
        format!(
            "{}{}",
            String::from_utf8_lossy(&MSG_REAL[..MSG_REAL.len() - 1]),
            String::from_utf8_lossy(&MSG_PROT[..MSG_PROT.len() - 1])
        )
    );

    let dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(dir.join("guest_programs.rs"), out)?;
    Ok(())
}
