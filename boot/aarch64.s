// dmakern aarch64 entry.
//
// The first 64 bytes are the arm64 Linux Image header (Documentation/arch/arm64/booting.rst), so the
// raw image boots from QEMU -kernel, the Raspberry Pi firmware (kernel8.img) and U-Boot booti.
// Until relocation is done nothing here may use an absolute address: only PC-relative adr/adrp.

.equ R_AARCH64_RELATIVE, 1027
.equ HCR_EL2_RW, (1 << 31)
.equ SCR_EL3_VALUE, 0x531            // NS | RES1(5:4) | HCE | RW: lower ELs non-secure AArch64
.equ SPSR_EL2H_MASKED, 0x3c9         // EL2h, DAIF masked
.equ SPSR_EL1H_MASKED, 0x3c5         // EL1h, DAIF masked
.equ SCTLR_EL1_RES1, 0x30d00800      // RES1 bits, MMU and caches off
.equ CPTR_EL2_NO_TRAPS, 0x33ff
.equ CNTHCTL_EL2_EL1_ACCESS, 3       // EL1PCTEN | EL1PCEN
.equ BOOT_STACK_SIZE, 0x10000
.equ MAX_CPUS, 8

.section .text.head, "ax"
.global _start
_start:
    b       primary_entry               // code0
    .long   0                           // code1
    .quad   0                           // text_offset: load at a 2 MiB aligned base + 0
    .quad   __image_size                // image_size, bss included
    .quad   0xa                         // flags: little-endian, 4 KiB pages, anywhere in RAM
    .quad   0                           // res2
    .quad   0                           // res3
    .quad   0                           // res4
    .ascii  "ARM\x64"                   // magic
    .long   0                           // res5 (no PE header)

primary_entry:
    mov     x19, x0                     // DTB physical address (boot protocol: x0)
    mrs     x20, CurrentEL
    ubfx    x20, x20, #2, #2            // entry exception level, for the banner
    msr     daifset, #0xf
    // Park everything but the boot CPU (MPIDR Aff0..Aff3 all zero): loaders that start every
    // core at the entry (QEMU raspi ELF images) must not run the kernel four times.
    mrs     x1, mpidr_el1
    mov     x2, #0xffffff
    movk    x2, #0xff, lsl #32
    tst     x1, x2
    b.ne    park
    bl      drop_to_el1
    adrp    x0, __bss_start
    add     x0, x0, :lo12:__bss_start
    adrp    x1, __bss_end
    add     x1, x1, :lo12:__bss_end
1:  cmp     x0, x1
    b.hs    2f
    stp     xzr, xzr, [x0], #16
    b       1b
2:  adrp    x0, boot_stacks
    add     x0, x0, :lo12:boot_stacks
    add     sp, x0, #BOOT_STACK_SIZE
    adrp    x21, __image_start
    add     x21, x21, :lo12:__image_start
    bl      apply_relocations
    cbnz    x0, park
    mov     x0, x19
    mov     x1, x21
    mov     x2, x20
    bl      dmakern_start_primary
park:
    wfe
    b       park

// Secondary CPUs, started by PSCI CPU_ON with x0 = the physical address of their boot parameters
// (src/smp.rs `BootParams`: MAIR, TCR, TTBR0 and SCTLR as the boot CPU runs them, the stack top,
// the CPU index), MMU and caches off. They take the boot CPU's translation regime as it is (the
// final kernel tables), so no relocation or early tables: the image is already relocated.
.global secondary_entry
secondary_entry:
    msr     daifset, #0xf
    mov     x19, x0
    bl      drop_to_el1
    ldp     x1, x2, [x19]               // MAIR, TCR
    msr     mair_el1, x1
    msr     tcr_el1, x2
    ldp     x1, x2, [x19, #16]          // TTBR0 (root and ASID), SCTLR
    msr     ttbr0_el1, x1
    isb
    tlbi    vmalle1                     // whatever firmware left in this CPU's TLB
    ic      iallu
    dsb     nsh
    isb
    msr     sctlr_el1, x2
    isb
    ldp     x1, x0, [x19, #32]          // stack top, CPU index
    mov     sp, x1
    msr     tpidr_el1, x0
    bl      dmakern_start_secondary
    b       park

// Enter EL1 (AArch64) from whatever level the loader used; keep EL1 access to the counters and FP.
drop_to_el1:
    mrs     x0, CurrentEL
    ubfx    x0, x0, #2, #2
    cmp     x0, #3
    b.eq    from_el3
    cmp     x0, #2
    b.eq    from_el2
    b       in_el1
from_el3:
    mov     x0, #SCR_EL3_VALUE
    msr     scr_el3, x0
    mov     x0, #SPSR_EL2H_MASKED
    msr     spsr_el3, x0
    adr     x0, from_el2
    msr     elr_el3, x0
    eret
from_el2:
    mov     x0, #HCR_EL2_RW
    msr     hcr_el2, x0
    mov     x0, #CNTHCTL_EL2_EL1_ACCESS
    msr     cnthctl_el2, x0
    msr     cntvoff_el2, xzr
    mov     x0, #CPTR_EL2_NO_TRAPS
    msr     cptr_el2, x0
    msr     hstr_el2, xzr
    mrs     x0, midr_el1
    msr     vpidr_el2, x0
    mrs     x0, mpidr_el1
    msr     vmpidr_el2, x0
    mov     x0, #(SCTLR_EL1_RES1 & 0xffff)
    movk    x0, #(SCTLR_EL1_RES1 >> 16), lsl #16
    msr     sctlr_el1, x0
    mov     x0, #SPSR_EL1H_MASKED
    msr     spsr_el2, x0
    adr     x0, in_el1
    msr     elr_el2, x0
    eret
in_el1:
    mov     x0, #(3 << 20)              // CPACR_EL1.FPEN: no FP/SIMD traps
    msr     cpacr_el1, x0
    adrp    x0, exception_vectors
    add     x0, x0, :lo12:exception_vectors
    msr     vbar_el1, x0
    isb
    ret

// Apply the R_AARCH64_RELATIVE entries of .rela.dyn and the packed ones of .relr.dyn for load
// base x21. Returns x0 = 0, or 1 on an unknown type.
apply_relocations:
    adrp    x0, __rela_start
    add     x0, x0, :lo12:__rela_start
    adrp    x1, __rela_end
    add     x1, x1, :lo12:__rela_end
1:  cmp     x0, x1
    b.hs    2f
    ldp     x2, x3, [x0], #16           // r_offset, r_info
    ldr     x4, [x0], #8                // r_addend
    cmp     w3, #R_AARCH64_RELATIVE
    b.ne    3f
    add     x4, x4, x21
    str     x4, [x21, x2]
    b       1b
// Then the RELR table (the ELF gABI's SHT_RELR), whose addends are the words in place: an even
// entry is the offset of one word to relocate, after which x5 points; an odd entry is a bitmap of
// which of the 63 words from x5 to relocate (bit i + 1 for word i), after which x5 moves on by 63.
2:  adrp    x0, __relr_start
    add     x0, x0, :lo12:__relr_start
    adrp    x1, __relr_end
    add     x1, x1, :lo12:__relr_end
    mov     x5, x21
4:  cmp     x0, x1
    b.hs    8f
    ldr     x2, [x0], #8
    tbnz    x2, #0, 5f
    add     x3, x21, x2
    ldr     x4, [x3]
    add     x4, x4, x21
    str     x4, [x3], #8
    mov     x5, x3
    b       4b
5:  lsr     x2, x2, #1
    mov     x3, x5
6:  cbz     x2, 7f
    tbz     x2, #0, 9f
    ldr     x4, [x3]
    add     x4, x4, x21
    str     x4, [x3]
9:  lsr     x2, x2, #1
    add     x3, x3, #8
    b       6b
7:  add     x5, x5, #(63 * 8)
    b       4b
8:  mov     x0, #0
    ret
3:  mov     x0, #1
    ret

// Exception vectors: each entry saves x0/x1, then exception_common saves the rest of the frame
// (x0..x30, ELR, SPSR, ESR, FAR, SP: 36 words) and calls dmakern_exception(frame, kind).
.equ FRAME_SIZE, 288
.macro VENTRY kind
    .balign 0x80
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       exception_common
.endm

.section .text.vectors, "ax"
.balign 0x800
.global exception_vectors
exception_vectors:
    VENTRY 0    // current EL, SP_EL0: sync
    VENTRY 1    // irq
    VENTRY 2    // fiq
    VENTRY 3    // serror
    VENTRY 4    // current EL, SP_ELx: sync
    VENTRY 5
    VENTRY 6
    VENTRY 7
    VENTRY 8    // lower EL, AArch64
    VENTRY 9
    VENTRY 10
    VENTRY 11
    VENTRY 12   // lower EL, AArch32
    VENTRY 13
    VENTRY 14
    VENTRY 15

exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x1, elr_el1
    stp     x30, x1, [sp, #240]
    mrs     x1, spsr_el1
    mrs     x2, esr_el1
    stp     x1, x2, [sp, #256]
    mrs     x1, far_el1
    add     x2, sp, #FRAME_SIZE
    stp     x1, x2, [sp, #272]
    mov     x1, x0
    mov     x0, sp
    bl      dmakern_exception
    ldp     x30, x1, [sp, #240]
    msr     elr_el1, x1
    ldr     x1, [sp, #256]
    msr     spsr_el1, x1
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #FRAME_SIZE
    eret

.section .noinit.boot_stacks, "aw", %nobits
.balign 16
.global boot_stacks
boot_stacks:
    .space  BOOT_STACK_SIZE * MAX_CPUS
