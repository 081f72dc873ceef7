// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Initializable} from "@openzeppelin/contracts/proxy/utils/Initializable.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {IShareToken} from "./interfaces/IShareToken.sol";

/// @title ShareToken
/// @notice Ownership shares of one model, deployed as a minimal clone per model. Only the ledger mints.
/// Inference revenue paid with `deposit` accrues per share through a magnified revenue-per-share accumulator.
/// Each account keeps a checkpoint (the accumulator when its balance last changed) and the revenue accrued up
/// to it, settled in `_update` before the balance changes, so mint, burn and transfer are neutral to every
/// holder's entitlement. Holders pull their revenue with `claim`. Accounting never reads the ETH balance, and
/// plain ETH transfers are refused, so forced ETH changes nobody's fraction. All divisions round down, in
/// favour of the pool.
///
/// Arithmetic bounds (why nothing here can overflow, for every reachable supply and deposit):
/// - Deposits are capped at MAX_TOTAL_DEPOSITED = 2^128 - 1 wei in a token's lifetime, so msg.value * 2^128 < 2^256
///   and the accumulator, a sum of floor(D_i * 2^128 / S_i) with S_i >= 1, stays below (2^128 - 1) * 2^128 < 2^256.
/// - What an account accrues between checkpoints, balance * (accumulator delta) / 2^128, is computed with
///   Math.mulDiv (512-bit intermediate) and is at most the sum of the deposits made meanwhile (the balance was at
///   most the supply at each of them), so it is below 2^128 as are all the per-account sums built from it.
/// - No product of the accumulator and a balance is ever stored (the corrections of the classic scheme were,
///   and overflowed once D * v / S1 >= 2^127).
/// Precision: one deposit loses less than supply / 2^128 wei to rounding of the accumulator (< 1 wei while the
/// supply is below 2^128), and each checkpoint of an account rounds its accrual down by less than 1 wei.
contract ShareToken is ERC20, Initializable, ReentrancyGuardTransient, IShareToken {
    using SafeCast for uint256;

    /// @notice Fixed-point scale of the revenue-per-share accumulator.
    uint256 public constant MAGNITUDE = 2 ** 128;
    /// @notice Most wei that `deposit` accepts over a token's lifetime (keeps the accumulator below 2^256).
    uint256 public constant MAX_TOTAL_DEPOSITED = type(uint128).max;

    /// @notice An account's revenue checkpoint.
    struct Checkpoint {
        uint256 revenuePerShare; // the accumulator when the account's balance last changed, or when it claimed
        uint256 accrued; // wei accrued up to that point and not yet claimed
    }

    string private _tokenName;
    string private _tokenSymbol;

    // Storage is packed so that deposit and claim write slots made non-zero by `initialize`:
    // the first deposit of a model then costs about as much as later ones.

    /// @notice The only account allowed to mint (the ContributionLedger).
    address public minter;
    /// @notice The model these shares belong to.
    uint64 public modelId;
    /// @notice Total wei deposited through `deposit`.
    uint128 public totalDeposited;
    /// @notice Total wei paid out through `claim`.
    uint128 public totalClaimed;
    /// @notice Revenue per share, scaled by MAGNITUDE. It starts at 1 (set by `initialize`) so that the first
    /// deposit writes a non-zero slot; `_update` checkpoints an account before it first holds shares, so that
    /// initial 1 is never paid to anyone.
    uint256 public magnifiedRevenuePerShare;

    mapping(address account => Checkpoint) private _checkpoints;
    mapping(address account => uint256) private _withdrawn;

    /// @notice The caller is not the minter.
    /// @param caller The caller.
    error ShareTokenNotMinter(address caller);
    /// @notice A deposit was made while no shares exist.
    error ShareTokenNoSupply();
    /// @notice A deposit of zero wei.
    error ShareTokenZeroDeposit();
    /// @notice The deposit would take the lifetime total above MAX_TOTAL_DEPOSITED.
    /// @param totalDeposited Wei deposited so far.
    /// @param value Wei sent with this deposit.
    /// @param maxTotalDeposited The lifetime cap.
    error ShareTokenDepositCapExceeded(uint256 totalDeposited, uint256 value, uint256 maxTotalDeposited);
    /// @notice The account has nothing to claim.
    /// @param account The account.
    error ShareTokenNothingToClaim(address account);
    /// @notice Plain ETH transfers are refused; use deposit.
    /// @param sender The sender.
    /// @param value Wei sent.
    error ShareTokenDirectTransferRefused(address sender, uint256 value);
    /// @notice The minter is zero.
    error ShareTokenInvalidMinter();

    /// @notice Inference revenue was deposited for the model.
    event RevenueDeposited(bytes32 indexed requestId, address indexed payer, uint256 amount, uint256 modelId);
    /// @notice A holder claimed revenue.
    event RevenueClaimed(address indexed account, uint256 amount);

    constructor() ERC20("", "") {
        _disableInitializers();
    }

    /// @inheritdoc IShareToken
    function initialize(string calldata name_, string calldata symbol_, uint256 modelId_, address minter_)
        external
        initializer
    {
        if (minter_ == address(0)) revert ShareTokenInvalidMinter();
        _tokenName = name_;
        _tokenSymbol = symbol_;
        modelId = modelId_.toUint64();
        minter = minter_;
        magnifiedRevenuePerShare = 1;
    }

    /// @notice Refuses plain ETH; revenue must go through `deposit`.
    receive() external payable {
        revert ShareTokenDirectTransferRefused(msg.sender, msg.value);
    }

    /// @inheritdoc IShareToken
    function mint(address to, uint256 amount) external {
        if (msg.sender != minter) revert ShareTokenNotMinter(msg.sender);
        _mint(to, amount);
    }

    /// @notice Pays inference revenue, shared pro rata among current holders.
    /// @param requestId The inference request this pays for (recorded in the event).
    function deposit(bytes32 requestId) external payable {
        if (msg.value == 0) revert ShareTokenZeroDeposit();
        uint256 supply = totalSupply();
        if (supply == 0) revert ShareTokenNoSupply();
        uint256 total = totalDeposited;
        if (msg.value > MAX_TOTAL_DEPOSITED - total) {
            revert ShareTokenDepositCapExceeded(total, msg.value, MAX_TOTAL_DEPOSITED);
        }
        totalDeposited = uint128(total + msg.value); // <= MAX_TOTAL_DEPOSITED, checked above
        // msg.value < 2^128, so the product fits; the sum stays below 2^256 (see the bounds above)
        magnifiedRevenuePerShare += (msg.value * MAGNITUDE) / supply;
        emit RevenueDeposited(requestId, msg.sender, msg.value, modelId);
    }

    /// @notice Sends the caller all revenue accrued to them so far.
    /// @return amount The wei sent.
    function claim() external nonReentrant returns (uint256 amount) {
        amount = claimableOf(msg.sender);
        if (amount == 0) revert ShareTokenNothingToClaim(msg.sender);
        Checkpoint storage c = _checkpoints[msg.sender];
        c.revenuePerShare = magnifiedRevenuePerShare;
        if (c.accrued != 0) c.accrued = 0;
        _withdrawn[msg.sender] += amount;
        totalClaimed += uint128(amount); // total claimed <= total deposited <= MAX_TOTAL_DEPOSITED
        emit RevenueClaimed(msg.sender, amount);
        Address.sendValue(payable(msg.sender), amount);
    }

    /// @notice Revenue accrued to `account` and not yet claimed, in wei (rounded down).
    function claimableOf(address account) public view returns (uint256) {
        Checkpoint storage c = _checkpoints[account];
        return c.accrued + _accruedSince(c.revenuePerShare, balanceOf(account));
    }

    /// @notice Revenue ever accrued to `account`, in wei (rounded down).
    function accumulatedOf(address account) external view returns (uint256) {
        return _withdrawn[account] + claimableOf(account);
    }

    /// @notice Revenue already claimed by `account`, in wei.
    function claimedOf(address account) external view returns (uint256) {
        return _withdrawn[account];
    }

    /// @notice The token name.
    function name() public view override returns (string memory) {
        return _tokenName;
    }

    /// @notice The token symbol.
    function symbol() public view override returns (string memory) {
        return _tokenSymbol;
    }

    function _update(address from, address to, uint256 value) internal override {
        if (from != address(0)) _checkpoint(from);
        if (to != address(0) && to != from) _checkpoint(to);
        super._update(from, to, value);
    }

    /// @dev Settles what `account` accrued at its current balance, before that balance changes.
    function _checkpoint(address account) private {
        Checkpoint storage c = _checkpoints[account];
        uint256 rps = magnifiedRevenuePerShare;
        uint256 since = c.revenuePerShare;
        if (since == rps) return;
        uint256 accrued = _accruedSince(since, balanceOf(account));
        if (accrued != 0) c.accrued += accrued;
        c.revenuePerShare = rps;
    }

    /// @dev balance * (accumulator - since) / MAGNITUDE with a 512-bit intermediate; at most the deposits made
    /// since the checkpoint, hence < 2^128.
    function _accruedSince(uint256 since, uint256 balance) private view returns (uint256) {
        return Math.mulDiv(balance, magnifiedRevenuePerShare - since, MAGNITUDE);
    }
}
